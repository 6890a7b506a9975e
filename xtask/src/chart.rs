//! PNG bar charts (plotters, bitmap backend): panels of horizontal grouped
//! bars, one row per category and one bar per series in each row.
//!
//! Text is rendered by plotters' `ab_glyph` backend from a TTF file read at
//! run time (Debian's `fonts-dejavu-core`), so no fontconfig or freetype
//! development packages are needed.

use anyhow::{anyhow, Context, Result};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::{register_font, FontStyle};
use std::path::Path;
use std::sync::OnceLock;

/// The TTF used for all text (package `fonts-dejavu-core`).
pub const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// The family name the font is registered under.
const FAMILY: &str = "sans-serif";

/// One panel: rows of categories, each with one value per series.
pub struct Panel {
    pub title: String,
    /// Category labels, drawn top to bottom.
    pub rows: Vec<String>,
    /// `values[row][series]`; `None` leaves the bar out.
    pub values: Vec<Vec<Option<f64>>>,
}

/// A chart: panels on a grid, sharing one legend of series names.
pub struct Chart {
    pub title: String,
    pub subtitle: String,
    pub series: Vec<String>,
    pub panels: Vec<Panel>,
    /// Panels per grid row.
    pub columns: usize,
    /// Label of the value axis.
    pub value_label: String,
}

const COLORS: &[RGBColor] = &[
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
];

/// Registers `font` with plotters (once per process; later calls return the
/// first call's outcome).
fn register(font: &Path) -> Result<()> {
    static REGISTERED: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| load_font(font).map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow!(e))
}

fn load_font(font: &Path) -> Result<()> {
    let bytes = std::fs::read(font).with_context(|| format!("reading font {}", font.display()))?;
    // plotters keeps registered fonts for the whole process and wants
    // `&'static [u8]`; this runs once per process, so leaking is the point.
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    register_font(FAMILY, FontStyle::Normal, bytes)
        .map_err(|_| anyhow!("{} is not a usable TrueType font", font.display()))
}

/// `12345` → `12.3k`, `1234567` → `1.23M`.
pub fn si(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if v >= 1e4 {
        format!("{:.0}k", v / 1e3)
    } else if v >= 1e3 {
        format!("{:.1}k", v / 1e3)
    } else {
        format!("{v:.0}")
    }
}

/// Draws `chart` into a PNG at `out`, using the TrueType font `font`.
pub fn draw(chart: &Chart, font: &Path, out: &Path) -> Result<()> {
    register(font)?;
    let columns = chart.columns.max(1);
    let grid_rows = chart.panels.len().div_ceil(columns).max(1);
    let max_rows = chart.panels.iter().map(|p| p.rows.len()).max().unwrap_or(1);
    let bar_px = 11 * chart.series.len().max(1) as u32 + 8;
    let panel_h = (max_rows as u32 * bar_px + 110).max(260);
    let (w, h) = (820 * columns as u32, 110 + panel_h * grid_rows as u32);
    let root = BitMapBackend::new(out, (w, h)).into_drawing_area();
    plot(chart, &root, grid_rows, columns).map_err(|e| anyhow!("drawing the chart: {e}"))?;
    root.present()
        .map_err(|e| anyhow!("writing {}: {e}", out.display()))
}

type DrawResult = std::result::Result<(), Box<dyn std::error::Error>>;

fn plot(
    chart: &Chart,
    root: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    grid_rows: usize,
    columns: usize,
) -> DrawResult {
    root.fill(&WHITE)?;
    let (head, body) = root.split_vertically(110);
    head.draw(&Text::new(
        chart.title.as_str(),
        (20, 14),
        (FAMILY, 30).into_font().color(&BLACK),
    ))?;
    head.draw(&Text::new(
        chart.subtitle.as_str(),
        (20, 52),
        (FAMILY, 17).into_font().color(&RGBColor(80, 80, 80)),
    ))?;
    // Legend, top right.
    let mut x = head.dim_in_pixel().0 as i32 - 20 - 150 * chart.series.len() as i32;
    for (i, name) in chart.series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        head.draw(&Rectangle::new([(x, 84), (x + 22, 100)], color.filled()))?;
        head.draw(&Text::new(
            name.as_str(),
            (x + 30, 83),
            (FAMILY, 17).into_font().color(&BLACK),
        ))?;
        x += 150;
    }
    let cells = body.split_evenly((grid_rows, columns));
    for (panel, area) in chart.panels.iter().zip(cells.iter()) {
        draw_panel(chart, panel, area)?;
    }
    Ok(())
}

fn draw_panel(
    chart: &Chart,
    panel: &Panel,
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
) -> DrawResult {
    let n = panel.rows.len();
    let max = panel
        .values
        .iter()
        .flatten()
        .flatten()
        .copied()
        .fold(0.0, f64::max);
    let xmax = if max > 0.0 { max * 1.18 } else { 1.0 };
    let label_width = panel
        .rows
        .iter()
        .map(|r| r.chars().count() as u32 * 9 + 16)
        .max()
        .unwrap_or(40);
    // Row i is drawn at y = n - 1 - i so that the first row is on top.
    let ymax = n as f64 - 0.5;
    let mut cc = ChartBuilder::on(area)
        .caption(panel.title.as_str(), (FAMILY, 21))
        .margin(12)
        .x_label_area_size(44)
        .y_label_area_size(label_width)
        .build_cartesian_2d(0f64..xmax, -0.5f64..ymax)?;
    let row_label = |y: &f64| {
        let r = y.round();
        if (y - r).abs() > 0.01 || r < 0.0 || r >= n as f64 {
            return String::new();
        }
        panel.rows[n - 1 - r as usize].clone()
    };
    let value_label = |x: &f64| si(*x);
    cc.configure_mesh()
        .disable_y_mesh()
        .y_labels(n + 1)
        .y_label_formatter(&row_label)
        .x_labels(6)
        .x_label_formatter(&value_label)
        .x_desc(chart.value_label.as_str())
        .label_style((FAMILY, 15))
        .axis_desc_style((FAMILY, 15))
        .draw()?;
    let s = chart.series.len().max(1);
    let band = 0.8 / s as f64;
    for (i, values) in panel.values.iter().enumerate() {
        let yc = (n - 1 - i) as f64;
        for (j, v) in values.iter().enumerate() {
            let Some(v) = *v else { continue };
            // Series 0 on top within the row.
            let top = yc + 0.4 - j as f64 * band;
            let bottom = top - band * 0.9;
            let color = COLORS[j % COLORS.len()];
            cc.draw_series(std::iter::once(Rectangle::new(
                [(0.0, bottom), (v, top)],
                color.filled(),
            )))?;
            let style = TextStyle::from((FAMILY, 13).into_font())
                .color(&BLACK)
                .pos(Pos::new(HPos::Left, VPos::Center));
            cc.draw_series(std::iter::once(Text::new(
                format!(" {}", si(v)),
                (v, (top + bottom) / 2.0),
                style,
            )))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn si_units() {
        assert_eq!(si(950.0), "950");
        assert_eq!(si(1234.0), "1.2k");
        assert_eq!(si(123_456.0), "123k");
        assert_eq!(si(2_345_678.0), "2.35M");
    }

    #[test]
    fn draws_a_png() {
        if !Path::new(FONT).is_file() {
            eprintln!("skipped: no {FONT}");
            return;
        }
        let dir = std::env::temp_dir().join(format!("xtask-chart-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let out = dir.join("t.png");
        let chart = Chart {
            title: "t".into(),
            subtitle: "s".into(),
            series: vec!["a".into(), "b".into()],
            panels: vec![Panel {
                title: "p".into(),
                rows: vec!["x".into(), "y".into()],
                values: vec![vec![Some(10.0), None], vec![Some(5.0), Some(20_000.0)]],
            }],
            columns: 1,
            value_label: "IOPS".into(),
        };
        draw(&chart, Path::new(FONT), &out).expect("chart drawn");
        let bytes = std::fs::read(&out).expect("png written");
        assert!(bytes.starts_with(b"\x89PNG"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
