//! The latency CDF of raw libvirt against deskvirt, and the scale run, as PNGs (plotters,
//! bitmap backend, DejaVu Sans read at run time for the labels).

use std::path::Path;

use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::scale::Step;
use crate::stats::Samples;

const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// Registers the label font once per process (plotters keeps fonts for its whole life).
fn font() -> anyhow::Result<()> {
    static DONE: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    DONE.get_or_init(|| {
        let bytes = std::fs::read(FONT).map_err(|e| format!("font {FONT}: {e}"))?;
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
            .map_err(|_| format!("font {FONT} is not a usable TrueType font"))
    })
    .clone()
    .map_err(|e| anyhow::anyhow!(e))
}

/// Draws both CDFs into `out`.
pub fn cdf(out: &Path, series: &[(&str, &Samples)]) -> anyhow::Result<()> {
    font()?;
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

/// A line of the RSS panel: its name, colour and what it reads from a step.
type RssSeries = (&'static str, RGBColor, fn(&Step) -> u64);

/// The scale run as a PNG: left, the fraction of each step's desktops Running over time;
/// right, operator RSS and mean and max agent RSS at each step (loaded), with the footprint run
/// last when there is one.
pub fn scale(out: &Path, steps: &[&Step]) -> anyhow::Result<()> {
    font()?;
    let root = BitMapBackend::new(out, (1200, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(draw)?;
    let (left, right) = root.split_horizontally(620);
    let tmax = steps
        .iter()
        .flat_map(|s| s.curve.last().map(|c| c.0))
        .fold(1.0_f64, f64::max)
        * 1.05;
    let mut chart = ChartBuilder::on(&left)
        .caption("Desktops Running after the first POST", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0.0..tmax, 0.0..1.0)
        .map_err(draw)?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc("fraction of the step's desktops Running")
        .draw()
        .map_err(draw)?;
    for (i, st) in steps.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let n = st.spec.desktops.max(1) as f64;
        let points: Vec<(f64, f64)> = st.curve.iter().map(|(t, k)| (*t, *k as f64 / n)).collect();
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))
            .map_err(draw)?
            .label(st.spec.label.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(draw)?;

    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    let ymax = steps
        .iter()
        .map(|s| mib(s.loaded.operator.rss).max(mib(s.loaded.agent_max_rss())))
        .fold(1.0_f64, f64::max)
        * 1.15;
    let n = steps.len();
    let labels: Vec<String> = steps
        .iter()
        .map(|s| format!("{}h/{}d", s.spec.hosts, s.spec.desktops))
        .collect();
    let mut chart = ChartBuilder::on(&right)
        .caption("RSS with all desktops Running", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(-0.5..(n as f64 - 0.5), 0.0..ymax)
        .map_err(draw)?;
    chart
        .configure_mesh()
        .x_labels(n.max(1))
        .x_label_formatter(&|x| {
            let i = x.round();
            if (x - i).abs() < 0.01 && i >= 0.0 {
                labels.get(i as usize).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .y_desc("MiB")
        .draw()
        .map_err(draw)?;
    let series: [RssSeries; 3] = [
        ("operator", BLUE, |s| s.loaded.operator.rss),
        ("agent (mean)", GREEN, |s| s.loaded.agent_mean().rss),
        ("agent (max)", RED, |s| s.loaded.agent_max_rss()),
    ];
    for (name, color, f) in series.iter() {
        let color = color.to_rgba();
        let points: Vec<(f64, f64)> = steps
            .iter()
            .enumerate()
            .map(|(i, s)| (i as f64, mib(f(s))))
            .collect();
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
            .map_err(draw)?
            .label(*name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        chart
            .draw_series(
                points
                    .into_iter()
                    .map(|p| Circle::new(p, 4, color.filled())),
            )
            .map_err(draw)?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(draw)?;
    root.present().map_err(draw)?;
    Ok(())
}

fn draw<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow::anyhow!("drawing a plot: {e:?}")
}
