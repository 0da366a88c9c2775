//! Draws `target/bench/cpu.json` as a PNG: forward time against n, one line per
//! (pattern, block), plus Burn's dense attention, on log-log axes.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use plotters::prelude::*;
use serde::Deserialize;

#[path = "../../examples/common/fonts.rs"]
mod fonts;

#[derive(Deserialize)]
struct Row {
    pattern: String,
    n: usize,
    block: usize,
    fwd_ms: f64,
    dense_fwd_ms: Option<f64>,
}

/// Reads the benchmark JSON and writes the plot next to it.
pub fn cpu(json: &Path, png: &Path) -> Result<()> {
    let rows: Vec<Row> = serde_json::from_str(
        &std::fs::read_to_string(json).with_context(|| format!("reading {}", json.display()))?,
    )?;
    let mut series: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for r in &rows {
        series
            .entry(format!("{} b={}", r.pattern, r.block))
            .or_default()
            .push((r.n as f64, r.fwd_ms));
        if let Some(dense) = r.dense_fwd_ms {
            series
                .entry("burn dense (causal)".into())
                .or_default()
                .push((r.n as f64, dense));
        }
    }
    for points in series.values_mut() {
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        points.dedup_by(|a, b| a.0 == b.0);
    }
    let all = series.values().flatten();
    let (x0, x1) = all
        .clone()
        .fold((f64::MAX, 0.0f64), |(lo, hi), p| (lo.min(p.0), hi.max(p.0)));
    let (y0, y1) = all.fold((f64::MAX, 0.0f64), |(lo, hi), p| (lo.min(p.1), hi.max(p.1)));
    let labels = fonts::register_sans_serif();
    let root = BitMapBackend::new(png, (1000, 700)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut builder = ChartBuilder::on(&root);
    builder
        .margin(20)
        .x_label_area_size(if labels { 40 } else { 0 })
        .y_label_area_size(if labels { 60 } else { 0 });
    if labels {
        builder.caption("forward time (ms) vs sequence length", ("sans-serif", 24));
    }
    let mut chart = builder.build_cartesian_2d(
        (x0 * 0.9..x1 * 1.1).log_scale(),
        (y0 * 0.8..y1 * 1.25).log_scale(),
    )?;
    let mut mesh = chart.configure_mesh();
    if !labels {
        mesh.disable_x_axis().disable_y_axis();
    }
    mesh.x_desc("n").y_desc("ms").draw()?;
    for (i, (name, points)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let drawn = chart.draw_series(LineSeries::new(
            points.iter().copied(),
            color.stroke_width(2),
        ))?;
        if labels {
            drawn.label(name.clone()).legend(move |(x, y)| {
                PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2))
            });
        }
        chart.draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
    }
    if labels {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
    }
    root.present()?;
    Ok(())
}
