//! Plot labels need a font: plotters' `ab_glyph` backend draws text only with a font
//! registered by hand. Shared by the examples' plots and `cargo xtask`'s.

use plotters::style::FontStyle;

/// Registers the first system sans-serif font found as plotters' `"sans-serif"`; `false`
/// when there is none (plots are then drawn without text).
pub fn register_sans_serif() -> bool {
    let candidates = [
        "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
        "/usr/share/fonts/TTF/DejaVuSans.ttf",
        "/usr/share/fonts/dejavu/DejaVuSans.ttf",
        "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
        "/System/Library/Fonts/Supplemental/Arial.ttf",
        "/Library/Fonts/Arial.ttf",
        "C:\\Windows\\Fonts\\arial.ttf",
    ];
    candidates.iter().any(|path| {
        std::fs::read(path)
            .ok()
            .map(|bytes| Box::leak(bytes.into_boxed_slice()))
            .is_some_and(|bytes| {
                plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok()
            })
    })
}
