//! SVG line charts for `cargo xtask bench --plot DIR`: one function, [`line_chart`], that
//! each benchmark family calls with its figures. The SVG carries its text as `<text>`
//! elements, so the viewer's fonts render it and nothing here reads font files.

use std::path::Path;

use anyhow::{anyhow, Context, Result};
use plotters::prelude::*;

/// One line of a chart.
pub(crate) struct Series {
    /// The legend entry.
    pub(crate) label: String,
    /// (x, y) in the units of the chart's axes, in drawing order.
    pub(crate) points: Vec<(f64, f64)>,
}

/// A line chart with points: x and y axes, optional log2 x axis (block sizes), a legend.
pub(crate) struct Chart {
    /// Printed above the plot.
    pub(crate) title: String,
    /// The x axis' description.
    pub(crate) x_label: String,
    /// The y axis' description.
    pub(crate) y_label: String,
    /// Block sizes: a log2 axis labelled 4K, 64K, 1M...
    pub(crate) log2_x: bool,
    /// The lines, each in its own colour.
    pub(crate) series: Vec<Series>,
}

/// Width and height of every chart, in SVG pixels: wide enough for a README column.
const SIZE: (u32, u32) = (800, 480);

/// Line colours in series order: distinct in hue and in lightness, so that they stay
/// apart for readers with the common colour-vision deficiencies.
const COLOURS: [RGBColor; 8] = [
    RGBColor(0, 114, 178),   // blue
    RGBColor(213, 94, 0),    // vermilion
    RGBColor(0, 158, 115),   // bluish green
    RGBColor(204, 121, 167), // reddish purple
    RGBColor(230, 159, 0),   // orange
    RGBColor(86, 180, 233),  // sky blue
    RGBColor(0, 0, 0),       // black
    RGBColor(240, 228, 66),  // yellow
];

/// A byte count as a block size label: 512, 4K, 64K, 1M, 2G.
fn bytes_label(bytes: f64) -> String {
    const UNITS: [(f64, &str); 3] = [
        (1024.0 * 1024.0 * 1024.0, "G"),
        (1024.0 * 1024.0, "M"),
        (1024.0, "K"),
    ];
    for (unit, suffix) in UNITS {
        if bytes >= unit {
            let v = bytes / unit;
            return if (v - v.round()).abs() < 1e-9 {
                format!("{v:.0}{suffix}")
            } else {
                format!("{v:.1}{suffix}")
            };
        }
    }
    format!("{bytes:.0}")
}

/// A tick value without trailing zeros: 2, 2.5, 0.25.
fn plain(v: f64) -> String {
    let s = format!("{v:.2}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// `lo..hi` widened so that no point sits on the frame, and never empty.
fn padded(lo: f64, hi: f64) -> (f64, f64) {
    if hi > lo {
        let pad = (hi - lo) * 0.05;
        (lo - pad, hi + pad)
    } else {
        (lo - 1.0, hi + 1.0)
    }
}

/// The corner of the plot where the legend covers the fewest points: upper left unless
/// the lines pass through it.
fn legend_corner(
    chart: &Chart,
    x: std::ops::Range<f64>,
    y_hi: f64,
    to_x: &dyn Fn(f64) -> f64,
) -> SeriesLabelPosition {
    // The legend's box as a fraction of the plot: about 30% wide, a line per series high.
    let (w, h) = (0.3, 0.06 + 0.06 * chart.series.len() as f64);
    let covered = |right: bool, top: bool| {
        let points = chart.series.iter().flat_map(|s| s.points.iter());
        points
            .filter(|&&(px, py)| {
                let fx = (to_x(px) - x.start) / (x.end - x.start);
                let fy = py / y_hi;
                let in_x = if right { fx >= 1.0 - w } else { fx <= w };
                let in_y = if top { fy >= 1.0 - h } else { fy <= h };
                in_x && in_y
            })
            .count()
    };
    [
        (SeriesLabelPosition::UpperLeft, false, true),
        (SeriesLabelPosition::UpperRight, true, true),
        (SeriesLabelPosition::LowerRight, true, false),
        (SeriesLabelPosition::LowerLeft, false, false),
    ]
    .into_iter()
    .min_by_key(|&(_, right, top)| covered(right, top))
    .map_or(SeriesLabelPosition::UpperLeft, |(p, _, _)| p)
}

/// Writes `chart` as an SVG file at `path`.
pub(crate) fn line_chart(path: &Path, chart: &Chart) -> Result<()> {
    let draw = |e| anyhow!("drawing {}: {e}", path.display());
    // On a log2 axis the chart plots log2(x); the labels turn the exponent back into bytes.
    let to_x = |x: f64| {
        if chart.log2_x {
            x.max(f64::MIN_POSITIVE).log2()
        } else {
            x
        }
    };
    let points = || chart.series.iter().flat_map(|s| s.points.iter());
    let (mut x_lo, mut x_hi) = (f64::INFINITY, f64::NEG_INFINITY);
    let mut y_hi = 0f64;
    for &(x, y) in points() {
        x_lo = x_lo.min(to_x(x));
        x_hi = x_hi.max(to_x(x));
        y_hi = y_hi.max(y);
    }
    if !x_lo.is_finite() || !x_hi.is_finite() {
        (x_lo, x_hi) = (0.0, 1.0);
    }
    let (x_lo, x_hi) = if chart.log2_x {
        // Whole powers of two at both ends, so each tick is a block size.
        (x_lo.floor() - 0.25, x_hi.ceil() + 0.25)
    } else {
        padded(x_lo, x_hi)
    };
    let y_hi = if y_hi.is_finite() && y_hi > 0.0 {
        y_hi * 1.15
    } else {
        1.0
    };

    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(draw)?;
    let mut plot = ChartBuilder::on(&root)
        .caption(&chart.title, ("sans-serif", 24))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(72)
        .build_cartesian_2d(x_lo..x_hi, 0f64..y_hi)
        .map_err(draw)?;

    let log2_x = chart.log2_x;
    let x_ticks = if log2_x {
        ((x_hi - x_lo).ceil() as usize).clamp(2, 24)
    } else {
        10
    };
    let x_format = move |x: &f64| {
        if !log2_x {
            return plain(*x);
        }
        // Only whole exponents are block sizes; other ticks stay unlabelled.
        if (x - x.round()).abs() < 1e-6 {
            bytes_label(x.round().exp2())
        } else {
            String::new()
        }
    };
    plot.configure_mesh()
        .x_desc(&chart.x_label)
        .y_desc(&chart.y_label)
        .x_labels(x_ticks)
        .x_label_formatter(&x_format)
        .y_label_formatter(&|y: &f64| plain(*y))
        .axis_desc_style(("sans-serif", 18))
        .label_style(("sans-serif", 15))
        .light_line_style(WHITE.mix(0.0))
        .bold_line_style(BLACK.mix(0.12))
        .draw()
        .map_err(draw)?;

    for (i, series) in chart.series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let xy: Vec<(f64, f64)> = series.points.iter().map(|&(x, y)| (to_x(x), y)).collect();
        plot.draw_series(LineSeries::new(xy.iter().copied(), colour.stroke_width(3)))
            .map_err(draw)?
            .label(&series.label)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 24, y)], colour.stroke_width(3))
            });
        plot.draw_series(xy.iter().map(|&p| Circle::new(p, 4, colour.filled())))
            .map_err(draw)?;
    }
    plot.configure_series_labels()
        .position(legend_corner(chart, x_lo..x_hi, y_hi, &to_x))
        .label_font(("sans-serif", 16))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .draw()
        .map_err(draw)?;
    root.present().map_err(draw)?;
    // The backend writes when dropped, too late to report an error: check the file is there.
    drop(plot);
    drop(root);
    std::fs::metadata(path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether `svg` has a `<text>` element reading exactly `text`.
    fn has_text(svg: &str, text: &str) -> bool {
        svg.split("<text").skip(1).any(|t| {
            let body = t.split_once('>').map_or("", |(_, b)| b);
            body.split_once("</text>")
                .is_some_and(|(b, _)| b.trim() == text)
        })
    }

    fn temp_dir(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("ferry-plot-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn writes_title_labels_and_lines() {
        let dir = temp_dir("lines");
        let path = dir.join("chart.svg");
        let chart = Chart {
            title: "ferry vs iperf3".into(),
            x_label: "block size".into(),
            y_label: "GB/s".into(),
            log2_x: true,
            series: vec![
                Series {
                    label: "ferry".into(),
                    points: vec![(4096.0, 1.0), (65536.0, 3.0), (1048576.0, 4.0)],
                },
                Series {
                    label: "iperf3".into(),
                    points: vec![(4096.0, 2.0), (65536.0, 3.5), (1048576.0, 4.5)],
                },
            ],
        };
        line_chart(&path, &chart).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(
            svg.starts_with("<svg") || svg.contains("<svg"),
            "not an SVG"
        );
        assert!(has_text(&svg, "ferry vs iperf3"), "title missing");
        assert!(
            has_text(&svg, "ferry") && has_text(&svg, "iperf3"),
            "a series label is missing"
        );
        assert!(
            svg.contains("<polyline") || svg.contains("<path"),
            "no line drawn"
        );
        // The log2 axis labels block sizes, not exponents.
        assert!(
            ["4K", "64K", "1M"].iter().all(|l| has_text(&svg, l)),
            "block size labels missing"
        );
    }

    #[test]
    fn empty_and_flat_charts_are_drawn() {
        let dir = temp_dir("flat");
        let path = dir.join("flat.svg");
        let chart = Chart {
            title: "flat".into(),
            x_label: "peers".into(),
            y_label: "GB/s".into(),
            log2_x: false,
            series: vec![
                Series {
                    label: "one point".into(),
                    points: vec![(1.0, 0.0)],
                },
                Series {
                    label: "none".into(),
                    points: vec![],
                },
            ],
        };
        line_chart(&path, &chart).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(has_text(&svg, "one point") && has_text(&svg, "none"));
    }

    #[test]
    fn block_size_labels() {
        assert_eq!(bytes_label(512.0), "512");
        assert_eq!(bytes_label(4096.0), "4K");
        assert_eq!(bytes_label(65536.0), "64K");
        assert_eq!(bytes_label(1048576.0), "1M");
        assert_eq!(bytes_label(1536.0), "1.5K");
        assert_eq!(plain(250.0), "250");
        assert_eq!(plain(2.5), "2.5");
        assert_eq!(plain(0.25), "0.25");
    }
}
