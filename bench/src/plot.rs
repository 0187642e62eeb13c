//! The latency CDF of raw libvirt against deskvirt as a PNG (plotters, bitmap backend, DejaVu
//! Sans read at run time for the labels).

use std::path::Path;

use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::stats::Samples;

const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// Draws both CDFs into `out`.
pub fn cdf(out: &Path, series: &[(&str, &Samples)]) -> anyhow::Result<()> {
    let bytes = std::fs::read(FONT).map_err(|e| anyhow::anyhow!("font {FONT}: {e}"))?;
    // plotters keeps fonts for the life of the process.
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow::anyhow!("font {FONT} is not a usable TrueType font"))?;
    let max = series
        .iter()
        .map(|(_, s)| s.max().as_secs_f64())
        .fold(0.0_f64, f64::max)
        * 1.1;
    let root = BitMapBackend::new(out, (800, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(draw)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Time to desktop (SPICE link accepted): CDF",
            ("sans-serif", 22),
        )
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(55)
        .build_cartesian_2d(0.0..max.max(0.1), 0.0..1.0)
        .map_err(draw)?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc("fraction of desktops")
        .draw()
        .map_err(draw)?;
    for (i, (name, samples)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let n = samples.len().max(1) as f64;
        let mut points = vec![(0.0, 0.0)];
        for (k, d) in samples.sorted().iter().enumerate() {
            let x = d.as_secs_f64();
            points.push((x, k as f64 / n));
            points.push((x, (k + 1) as f64 / n));
        }
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))
            .map_err(draw)?
            .label(*name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(draw)?;
    root.present().map_err(draw)?;
    Ok(())
}

fn draw<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow::anyhow!("drawing the CDF: {e:?}")
}
