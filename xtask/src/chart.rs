//! The bench report's SVG charts, drawn with plotters' SVG backend: horizontal grouped bars
//! with target marks, and lines on linear or log axes.

use plotters::{
    coord::Shift,
    prelude::*,
    style::text_anchor::{HPos, Pos, VPos},
};

pub const BLUE: RGBColor = RGBColor(0x3b, 0x6f, 0xb6);
pub const ORANGE: RGBColor = RGBColor(0xe0, 0x82, 0x2d);
pub const GREEN: RGBColor = RGBColor(0x4a, 0x9a, 0x4a);
pub const GREY: RGBColor = RGBColor(0x9a, 0xa3, 0xad);
const TARGET: RGBColor = RGBColor(0xc0, 0x39, 0x2b);
const GRID: RGBColor = RGBColor(0xe3, 0xe6, 0xea);
const INK: RGBColor = RGBColor(0x33, 0x33, 0x33);
const FONT: &str = "sans-serif";

/// One series of a bar chart: a value per category.
pub struct Bars {
    pub name: &'static str,
    pub values: Vec<f64>,
    pub color: RGBColor,
}

/// One line of a line chart.
pub struct Line {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    pub color: RGBColor,
}

/// Ticks 1, 2, 5 × 10^k covering 0..=max.
pub fn nice_ticks(max: f64) -> Vec<f64> {
    if max <= 0.0 || !max.is_finite() {
        return vec![0.0, 1.0];
    }
    let raw = max / 5.0;
    let magnitude = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * magnitude)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * magnitude);
    let mut ticks = vec![0.0];
    while *ticks.last().expect("not empty") < max {
        ticks.push(ticks.len() as f64 * step);
    }
    ticks
}

/// A number as an axis or bar label: 12, 1.5, 0.25, 20k, 3M.
pub fn label(v: f64) -> String {
    if v == 0.0 {
        "0".to_owned()
    } else if v.abs() >= 1e6 {
        format!("{:.0}M", v / 1e6)
    } else if v.abs() >= 1e4 {
        format!("{:.0}k", v / 1e3)
    } else if v.abs() >= 10.0 || v.fract() == 0.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
            .trim_end_matches('0')
            .trim_end_matches('.')
            .to_owned()
    }
}

/// Text of `px` pixels (plotters divides a font size by 1.24 for SVG).
fn font(px: f64) -> TextStyle<'static> {
    (FONT, px * 1.24).into_font().color(&INK)
}

/// The legend as one row under the plot (plotters' own legend box sits inside the plot,
/// over the data): a swatch and a name per entry.
fn legend<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    y: i32,
    x: i32,
    entries: &[(String, RGBColor, bool)],
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    let mut x = x;
    for (name, color, is_mark) in entries {
        if *is_mark {
            root.draw(&PathElement::new(
                vec![(x + 5, y - 6), (x + 5, y + 6)],
                color.stroke_width(3),
            ))?;
        } else {
            root.draw(&Rectangle::new(
                [(x, y - 6), (x + 12, y + 6)],
                color.filled(),
            ))?;
        }
        root.draw(&Text::new(
            name.clone(),
            (x + 17, y),
            font(12.0).pos(Pos::new(HPos::Left, VPos::Center)),
        ))?;
        x += 34 + 7 * name.chars().count() as i32;
    }
    Ok(())
}

/// Horizontal grouped bars: one row per category, one bar per series with its value at the
/// end, an optional target mark per category.
pub fn bar_chart(
    title: &str,
    categories: &[String],
    series: &[Bars],
    targets: &[Option<f64>],
    unit: &str,
) -> String {
    let label_w = 24
        + 7 * categories
            .iter()
            .map(|c| c.chars().count())
            .max()
            .unwrap_or(10);
    let row_h = 16 * series.len().max(1) + 14;
    let height = 50 + row_h * categories.len() + 80;
    // A bold 16 px title is about 10.5 px per character; it is centred, so leave room.
    let width = (label_w + 600).max(40 + 21 * title.chars().count() / 2);
    let max = series
        .iter()
        .flat_map(|s| s.values.iter().copied())
        .chain(targets.iter().flatten().copied())
        .fold(0.0, f64::max);
    let ticks = nice_ticks(max);
    let top = *ticks.last().expect("ticks");
    let mut svg = String::new();
    draw_bars(
        &mut svg,
        (width as u32, height as u32),
        label_w as u32,
        title,
        categories,
        series,
        targets,
        unit,
        (top, ticks.len()),
    )
    .expect("drawing into a String cannot fail");
    svg
}

#[expect(
    clippy::too_many_arguments,
    reason = "one private drawing step of bar_chart"
)]
fn draw_bars(
    svg: &mut String,
    size: (u32, u32),
    label_w: u32,
    title: &str,
    categories: &[String],
    series: &[Bars],
    targets: &[Option<f64>],
    unit: &str,
    (top, tick_count): (f64, usize),
) -> Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::with_string(svg, size).into_drawing_area();
    root.fill(&WHITE)?;
    let n = categories.len();
    // Row r (category n-1-r) spans y in [r, r+1]; its label sits at the row's centre.
    let mut chart = ChartBuilder::on(&root)
        .caption(
            title,
            (FONT, 16.0 * 1.24).into_font().style(FontStyle::Bold),
        )
        .margin(12)
        .margin_bottom(40)
        .margin_right(50)
        .x_label_area_size(36)
        .y_label_area_size(label_w)
        .build_cartesian_2d(0f64..top, 0f64..n.max(1) as f64)?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .x_labels(tick_count)
        .x_label_formatter(&|v| label(*v))
        // Category names, not numbers, label the rows: drawn below at each row's centre.
        .y_labels(0)
        .x_desc(unit)
        .label_style(font(12.0))
        .axis_desc_style(font(12.0))
        .light_line_style(WHITE)
        .bold_line_style(GRID)
        .axis_style(GREY)
        .draw()?;
    for (i, category) in categories.iter().enumerate() {
        let (x, y) = chart.backend_coord(&(0.0, (n - 1 - i) as f64 + 0.5));
        root.draw(&Text::new(
            category.clone(),
            (x - 8, y),
            font(12.0).pos(Pos::new(HPos::Right, VPos::Center)),
        ))?;
    }
    let band = 0.8 / series.len().max(1) as f64;
    for (j, b) in series.iter().enumerate() {
        chart.draw_series(b.values.iter().enumerate().map(|(i, &v)| {
            let r = (n - 1 - i) as f64;
            let y1 = r + 0.9 - band * j as f64;
            Rectangle::new(
                [(0.0, y1 - band * 0.88), (v.max(0.0), y1)],
                b.color.filled(),
            )
        }))?;
        chart.draw_series(b.values.iter().enumerate().map(|(i, &v)| {
            let r = (n - 1 - i) as f64;
            let y = r + 0.9 - band * (j as f64 + 0.44);
            EmptyElement::at((v.max(0.0), y))
                + Text::new(
                    label(v),
                    (4, 0),
                    font(12.0).pos(Pos::new(HPos::Left, VPos::Center)),
                )
        }))?;
    }
    chart.draw_series(targets.iter().enumerate().filter_map(|(i, t)| {
        let r = (n - 1 - i) as f64;
        t.map(|t| PathElement::new(vec![(t, r + 0.05), (t, r + 0.95)], TARGET.stroke_width(3)))
    }))?;
    let mut entries: Vec<(String, RGBColor, bool)> = series
        .iter()
        .map(|b| (b.name.to_owned(), b.color, false))
        .collect();
    if targets.iter().any(Option::is_some) {
        entries.push(("target".to_owned(), TARGET, true));
    }
    legend(&root, size.1 as i32 - 22, label_w as i32 + 12, &entries)?;
    root.present()?;
    Ok(())
}

/// Lines with points; log scales by decade.
pub fn line_chart(
    title: &str,
    x_label: &str,
    y_label: &str,
    lines: &[Line],
    log_x: bool,
    log_y: bool,
) -> String {
    let width = 720.max(40 + 21 * title.chars().count() as u32 / 2);
    let size = (width, 400 + 20 * lines.len() as u32);
    let mut svg = String::new();
    draw_lines(&mut svg, size, title, x_label, y_label, lines, log_x, log_y)
        .expect("drawing into a String cannot fail");
    svg
}

/// An axis range: whole decades on a log axis, 0 to a nice tick on a linear one.
fn range(values: impl Iterator<Item = f64>, log: bool) -> std::ops::Range<f64> {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if lo > hi {
        return if log { 1.0..10.0 } else { 0.0..1.0 };
    }
    if log {
        let lo = 10f64.powf(lo.max(1e-9).log10().floor());
        let hi = 10f64.powf(hi.max(lo * 10.0).log10().ceil());
        lo..hi
    } else {
        0.0..*nice_ticks(hi.max(0.0)).last().expect("ticks")
    }
}

#[expect(
    clippy::too_many_arguments,
    reason = "one private drawing step of line_chart"
)]
fn draw_lines(
    svg: &mut String,
    size: (u32, u32),
    title: &str,
    x_label: &str,
    y_label: &str,
    lines: &[Line],
    log_x: bool,
    log_y: bool,
) -> Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::with_string(svg, size).into_drawing_area();
    root.fill(&WHITE)?;
    let (plot, legend_area) = root.split_vertically(size.1 - 20 * lines.len() as u32 - 10);
    let xs = range(
        lines.iter().flat_map(|l| l.points.iter().map(|p| p.0)),
        log_x,
    );
    let ys = range(
        lines.iter().flat_map(|l| l.points.iter().map(|p| p.1)),
        log_y,
    );
    let scale = |name: &str, log: bool| {
        if log {
            format!("{name} (log scale)")
        } else {
            name.to_owned()
        }
    };
    let mut builder = ChartBuilder::on(&plot);
    builder
        .caption(
            title,
            (FONT, 16.0 * 1.24).into_font().style(FontStyle::Bold),
        )
        .margin(12)
        .margin_right(24)
        .x_label_area_size(44)
        .y_label_area_size(64);
    // Four axis kinds are four coordinate types: one macro body draws them all.
    macro_rules! draw {
        ($x:expr, $y:expr) => {{
            let mut chart = builder.build_cartesian_2d($x, $y)?;
            chart
                .configure_mesh()
                .x_label_formatter(&|v| label(*v))
                .y_label_formatter(&|v| label(*v))
                .x_desc(scale(x_label, log_x))
                .y_desc(scale(y_label, log_y))
                .label_style(font(12.0))
                .axis_desc_style(font(12.0))
                .light_line_style(WHITE)
                .bold_line_style(GRID)
                .axis_style(GREY)
                .draw()?;
            for l in lines {
                chart.draw_series(LineSeries::new(
                    l.points.iter().copied(),
                    l.color.stroke_width(2),
                ))?;
                chart.draw_series(
                    l.points
                        .iter()
                        .map(|&p| Circle::new(p, 3.5, l.color.filled())),
                )?;
            }
        }};
    }
    match (log_x, log_y) {
        (true, true) => draw!(xs.log_scale(), ys.log_scale()),
        (true, false) => draw!(xs.log_scale(), ys),
        (false, true) => draw!(xs, ys.log_scale()),
        (false, false) => draw!(xs, ys),
    }
    for (i, l) in lines.iter().enumerate() {
        let y = 8 + 20 * i as i32;
        legend_area.draw(&PathElement::new(
            vec![(76, y), (98, y)],
            l.color.stroke_width(3),
        ))?;
        legend_area.draw(&Text::new(
            l.name.clone(),
            (104, y),
            font(12.0).pos(Pos::new(HPos::Left, VPos::Center)),
        ))?;
    }
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_cover_the_maximum() {
        for max in [0.3, 1.0, 7.0, 42.0, 999.0, 1234.5] {
            let t = nice_ticks(max);
            assert!(*t.last().unwrap() >= max, "{max}: {t:?}");
            assert!(t.len() <= 12, "{max}: {t:?}");
        }
    }

    #[test]
    fn charts_are_well_formed() {
        let bars = bar_chart(
            "t <&>",
            &["a".into(), "b".into()],
            &[Bars {
                name: "x",
                values: vec![1.0, 2.0],
                color: BLUE,
            }],
            &[Some(1.5), None],
            "ns",
        );
        assert!(bars.starts_with("<svg") && bars.trim_end().ends_with("</svg>"));
        assert!(bars.contains("t &lt;&amp;&gt;"), "title escaped");
        assert!(
            bars.contains("\na\n") && bars.contains("\nb\n"),
            "category labels"
        );
        let lines = line_chart(
            "t",
            "x",
            "y",
            &[Line {
                name: "l".into(),
                points: vec![(1.0, 5.0), (1000.0, 7.0)],
                color: BLUE,
            }],
            true,
            false,
        );
        assert!(lines.contains("<polyline"));
        assert!(!lines.contains("NaN"));
    }

    /// Writes sample charts into `$MLB_CHART_SAMPLES` to look at (`rsvg-convert F.svg -o
    /// F.png`); does nothing without it.
    #[test]
    fn write_samples() {
        let Ok(dir) = std::env::var("MLB_CHART_SAMPLES") else {
            return;
        };
        let cats: Vec<String> = [
            "established TCP flow (IPIP)",
            "UDP flow",
            "IPv6 flow",
            "new TCP flow (SYN, conntrack insert)",
            "not for a Vip",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let bars = bar_chart(
            "Per-packet cost above an empty XDP program (ns, BPF_PROG_TEST_RUN)",
            &cats,
            &[
                Bars {
                    name: "mlb",
                    values: vec![26.0, 28.0, 39.0, 496.0, 6.0],
                    color: BLUE,
                },
                Bars {
                    name: "no flow cache",
                    values: vec![40.0, 42.0, 55.0, 510.0, 6.5],
                    color: ORANGE,
                },
            ],
            &[Some(30.0), None, Some(30.0), Some(180.0), Some(15.0)],
            "ns per packet above empty",
        );
        std::fs::write(format!("{dir}/bars.svg"), bars).unwrap();
        let lines = line_chart(
            "MaglevTable build time (median ms, single core) vs backends N",
            "backends N",
            "ms",
            &[
                Line {
                    name: "M = 65537".into(),
                    points: vec![(10.0, 0.81), (100.0, 0.92), (1000.0, 0.88), (10000.0, 1.2)],
                    color: BLUE,
                },
                Line {
                    name: "M = 655373".into(),
                    points: vec![(10.0, 10.1), (100.0, 11.4), (1000.0, 11.8), (10000.0, 13.4)],
                    color: ORANGE,
                },
            ],
            true,
            true,
        );
        std::fs::write(format!("{dir}/lines.svg"), lines).unwrap();
        let lin = line_chart(
            "Per-packet cost vs active flows",
            "flows",
            "ns above empty",
            &[Line {
                name: "established TCP flow".into(),
                points: vec![
                    (1.0, 30.0),
                    (1000.0, 120.0),
                    (10000.0, 325.0),
                    (100000.0, 434.0),
                    (1000000.0, 658.0),
                ],
                color: GREEN,
            }],
            true,
            false,
        );
        std::fs::write(format!("{dir}/loglin.svg"), lin).unwrap();
    }
}
