//! A dependency-free SVG plot of memory over time: the bytes charged per model as
//! stacked areas, the budget as a dashed line, and marks where swaps began and ended.

use std::collections::BTreeMap;
use std::fmt::Write;

/// One sample of the pool's status.
pub struct Point {
    /// Seconds since the start of the run.
    pub t: f64,
    pub budget: u64,
    /// Bytes charged per model.
    pub series: BTreeMap<String, u64>,
}

const W: f64 = 900.0;
const H: f64 = 420.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 170.0;
const TOP: f64 = 30.0;
const BOTTOM: f64 = 40.0;
const COLORS: [&str; 8] = [
    "#4e79a7", "#59a14f", "#edc948", "#b07aa1", "#f28e2b", "#e15759", "#76b7b2", "#9c755f",
];

/// The plot; `swaps` are (seconds, model, "start" | "ready"); a vertical rule marks
/// `phase_boundary` (where the swapping phase begins).
pub fn memory_plot(
    points: &[Point],
    swaps: &[(f64, String, String)],
    phase_boundary: f64,
) -> String {
    let mut out = String::new();
    let t_max = points.last().map_or(1.0, |p| p.t).max(1.0);
    let y_max = points
        .iter()
        .map(|p| p.budget.max(p.series.values().sum()))
        .max()
        .unwrap_or(1)
        .max(1) as f64
        * 1.1;
    let x = |t: f64| LEFT + t / t_max * (W - LEFT - RIGHT);
    let y = |b: f64| H - BOTTOM - b / y_max * (H - TOP - BOTTOM);
    let gib = |b: f64| b / (1u64 << 30) as f64;
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(out, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let names: Vec<String> = points
        .iter()
        .flat_map(|p| p.series.keys().cloned())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    // Stacked areas, bottom to top in name order.
    let mut below = vec![0u64; points.len()];
    for (i, name) in names.iter().enumerate() {
        let top: Vec<u64> = points
            .iter()
            .zip(&below)
            .map(|(p, b)| b + p.series.get(name).copied().unwrap_or(0))
            .collect();
        let mut d = String::new();
        for (p, v) in points.iter().zip(&top) {
            let _ = write!(
                d,
                "{}{:.1},{:.1} ",
                if d.is_empty() { "M" } else { "L" },
                x(p.t),
                y(*v as f64)
            );
        }
        for (p, v) in points.iter().zip(&below).rev() {
            let _ = write!(d, "L{:.1},{:.1} ", x(p.t), y(*v as f64));
        }
        let color = COLORS[i % COLORS.len()];
        let _ = writeln!(
            out,
            r#"<path d="{d}Z" fill="{color}" fill-opacity="0.75" stroke="none"/>"#
        );
        let ly = TOP + 18.0 * i as f64;
        let _ = writeln!(
            out,
            r#"<rect x="{}" y="{}" width="12" height="12" fill="{color}"/><text x="{}" y="{}">{name}</text>"#,
            W - RIGHT + 15.0,
            ly,
            W - RIGHT + 32.0,
            ly + 10.0
        );
        below = top;
    }
    // Budget.
    let mut d = String::new();
    for p in points {
        let _ = write!(
            d,
            "{}{:.1},{:.1} ",
            if d.is_empty() { "M" } else { "L" },
            x(p.t),
            y(p.budget as f64)
        );
    }
    let _ = writeln!(
        out,
        r#"<path d="{d}" fill="none" stroke="black" stroke-width="2" stroke-dasharray="6,4"/>"#
    );
    let ly = TOP + 18.0 * names.len() as f64;
    let _ = writeln!(
        out,
        r#"<line x1="{}" y1="{}" x2="{}" y2="{}" stroke="black" stroke-width="2" stroke-dasharray="6,4"/><text x="{}" y="{}">budget</text>"#,
        W - RIGHT + 15.0,
        ly + 6.0,
        W - RIGHT + 27.0,
        ly + 6.0,
        W - RIGHT + 32.0,
        ly + 10.0
    );
    // Swap marks: red where a swap began, green where the incoming model was ready.
    for (t, _, what) in swaps {
        let color = if what == "start" {
            "#d62728"
        } else {
            "#2ca02c"
        };
        let _ = writeln!(
            out,
            r#"<line x1="{0:.1}" y1="{1}" x2="{0:.1}" y2="{2}" stroke="{color}" stroke-width="1"/>"#,
            x(*t),
            TOP,
            H - BOTTOM
        );
    }
    let _ = writeln!(
        out,
        r#"<line x1="{0:.1}" y1="{1}" x2="{0:.1}" y2="{2}" stroke="gray" stroke-dasharray="2,3"/><text x="{3:.1}" y="{4}">swapping from here</text>"#,
        x(phase_boundary),
        TOP,
        H - BOTTOM,
        x(phase_boundary) + 4.0,
        TOP + 12.0
    );
    // Axes.
    let _ = writeln!(
        out,
        r#"<line x1="{LEFT}" y1="{0}" x2="{1}" y2="{0}" stroke="black"/><line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{0}" stroke="black"/>"#,
        H - BOTTOM,
        W - RIGHT
    );
    for i in 0..=5 {
        let b = y_max / 5.0 * i as f64;
        let _ = writeln!(
            out,
            r#"<text x="{}" y="{:.1}" text-anchor="end">{:.1} GiB</text>"#,
            LEFT - 6.0,
            y(b) + 4.0,
            gib(b)
        );
        let t = t_max / 5.0 * i as f64;
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{}" text-anchor="middle">{t:.0} s</text>"#,
            x(t),
            H - BOTTOM + 18.0
        );
    }
    let _ = writeln!(
        out,
        r#"<text x="{LEFT}" y="16">bytes charged per model (stacked) against the RAM budget; red: swap started, green: swapped-in model ready</text>"#
    );
    out.push_str("</svg>\n");
    out
}
