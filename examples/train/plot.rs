//! The loss curves as a PNG.

use std::path::Path;

use plotters::prelude::*;

#[path = "../common/fonts.rs"]
mod fonts;

/// Draws training and validation bits per byte against the step into `path`.
pub fn loss_curves(
    path: &Path,
    title: &str,
    train: &[(usize, f64)],
    valid: &[(usize, f64)],
) -> anyhow::Result<()> {
    let labels = fonts::register_sans_serif();
    let root = BitMapBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let last = train
        .iter()
        .chain(valid)
        .map(|p| p.0)
        .max()
        .unwrap_or(1)
        .max(1);
    let top = train.iter().chain(valid).map(|p| p.1).fold(1.0, f64::max) * 1.05;
    let mut builder = ChartBuilder::on(&root);
    builder
        .margin(12)
        .x_label_area_size(if labels { 40 } else { 0 })
        .y_label_area_size(if labels { 56 } else { 0 });
    if labels {
        builder.caption(title, ("sans-serif", 22));
    }
    let mut chart = builder.build_cartesian_2d(0..last, 0.0..top)?;
    let mut mesh = chart.configure_mesh();
    if !labels {
        mesh.disable_x_axis().disable_y_axis();
    }
    mesh.x_desc("step").y_desc("bits per byte").draw()?;
    for (name, points, color) in [("train", train, BLUE), ("validation", valid, RED)] {
        let drawn = chart.draw_series(LineSeries::new(
            points.iter().copied(),
            color.stroke_width(2),
        ))?;
        if labels {
            drawn
                .label(name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        }
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
