//! Gathers the repository's own text (Markdown docs, then Rust sources) into
//! `$OUT_DIR/corpus.txt`: the default training data of the `train` example, so that
//! `cargo run --example train` needs no download.
//!
//! Outside the workspace (a published crate) only this crate's files exist; they are used.

use std::fs;
use std::path::{Path, PathBuf};

fn collect(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') || name == "target" {
            continue;
        }
        if path.is_dir() {
            collect(&path, out);
        } else if name.ends_with(".md") || name.ends_with(".rs") {
            out.push(path);
        }
    }
}

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let workspace = manifest.join("../..");
    let root = if workspace.join("crates").is_dir() {
        workspace
    } else {
        manifest
    };
    let mut files = Vec::new();
    for dir in ["README.md", "crates", "examples", "xtask"] {
        let path = root.join(dir);
        println!("cargo:rerun-if-changed={}", path.display());
        if path.is_file() {
            files.push(path);
        } else {
            collect(&path, &mut files);
        }
    }
    // Docs first, then sources, each in a fixed order: the split is reproducible.
    files.sort_by_key(|p| (!p.to_string_lossy().ends_with(".md"), p.clone()));
    let mut corpus = String::new();
    for file in files {
        if let Ok(text) = fs::read_to_string(&file) {
            corpus.push_str(&text);
            corpus.push('\n');
        }
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("set by cargo")).join("corpus.txt");
    fs::write(out, corpus).expect("OUT_DIR is writable");
}
