//! Large output buffers backed by transparent huge pages.
//!
//! Every call hands its outputs (and gradients) to the backend as fresh buffers of tens of
//! MiB; with 4 KiB pages their first touch costs one page fault per page, a visible share
//! of a backward pass that writes tens of MiB of gradients. On Linux, where the
//! kernel's transparent huge pages are in `madvise` mode (the common default), asking for
//! huge pages turns that into one fault per 2 MiB.

use crate::real::Real;

/// Buffers below this many bytes are left to the allocator as they are.
#[cfg(target_os = "linux")]
const HUGE_PAGE_MIN_BYTES: usize = 4 << 20;

/// A zeroed buffer of `len` elements; large ones ask the OS for transparent huge pages
/// before they are first touched.
pub fn zeroed<T: Real>(len: usize) -> Vec<T> {
    let buffer = vec![T::ZERO; len];
    #[cfg(target_os = "linux")]
    advise_huge_pages(buffer.as_ptr() as usize, len * std::mem::size_of::<T>());
    buffer
}

/// An empty buffer with room for `capacity` elements, to be filled by pushing (a gather);
/// large ones ask the OS for transparent huge pages before they are first touched.
pub fn with_capacity<T>(capacity: usize) -> Vec<T> {
    let buffer = Vec::<T>::with_capacity(capacity);
    #[cfg(target_os = "linux")]
    advise_huge_pages(
        buffer.as_ptr() as usize,
        capacity * std::mem::size_of::<T>(),
    );
    buffer
}

/// Asks for transparent huge pages over the 2 MiB-aligned part of the `bytes` (an
/// allocation's capacity) from address `start`, when they are many.
#[cfg(target_os = "linux")]
fn advise_huge_pages(start: usize, bytes: usize) {
    if bytes >= HUGE_PAGE_MIN_BYTES {
        const HUGE: usize = 2 << 20;
        let aligned = start.next_multiple_of(HUGE);
        let end = (start + bytes) & !(HUGE - 1);
        if end > aligned {
            // SAFETY: `[aligned, end)` lies inside the allocation (`bytes` from `start`);
            // MADV_HUGEPAGE only changes how the kernel backs those pages, not their
            // contents or validity. A failure (e.g. THP disabled) leaves normal pages.
            unsafe {
                libc::madvise(
                    aligned as *mut libc::c_void,
                    end - aligned,
                    libc::MADV_HUGEPAGE,
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn zeroed_buffers_of_every_size() {
        for len in [0, 1, 1000, 3 << 20] {
            let buffer = super::zeroed::<f32>(len);
            assert_eq!(buffer.len(), len);
            assert!(buffer.iter().all(|&x| x == 0.0));
        }
    }
}
