//! `--plot FILE.svg`: p50 and p99 latency per second as two polylines on a
//! hand-drawn SVG chart (axes, grid, labels). No plotting crate: the chart
//! is a few dozen elements of text.

use std::fmt::Write as _;

const W: f64 = 800.0;
const H: f64 = 400.0;
const LEFT: f64 = 60.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 30.0;
const BOTTOM: f64 = 40.0;

/// One point per second: (second, p50 ms, p99 ms); seconds without
/// deliveries are `None` and are skipped.
pub fn svg(title: &str, points: &[(u64, Option<f64>, Option<f64>)]) -> String {
    let xmax = points.iter().map(|p| p.0).max().unwrap_or(1).max(1) as f64;
    let ymax = points
        .iter()
        .filter_map(|p| p.2.or(p.1))
        .fold(0.0_f64, f64::max);
    let ymax = nice_ceiling(ymax.max(0.001));
    let x = |t: f64| LEFT + (W - LEFT - RIGHT) * t / xmax;
    let y = |v: f64| H - BOTTOM - (H - TOP - BOTTOM) * v / ymax;
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = write!(s, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let _ = write!(
        s,
        r#"<text x="{}" y="18" text-anchor="middle" font-size="14">{}</text>"#,
        W / 2.0,
        escape(title)
    );
    for i in 0..=5 {
        let v = ymax * f64::from(i) / 5.0;
        let _ = write!(
            s,
            r##"<line x1="{LEFT}" x2="{}" y1="{y0}" y2="{y0}" stroke="#ddd"/><text x="{}" y="{}" text-anchor="end">{}</text>"##,
            W - RIGHT,
            LEFT - 6.0,
            y(v) + 4.0,
            fmt_ms(v),
            y0 = y(v)
        );
    }
    let step = (xmax / 10.0).ceil().max(1.0);
    let mut t = 0.0;
    while t <= xmax {
        let _ = write!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle">{t}</text>"#,
            x(t),
            H - BOTTOM + 16.0
        );
        t += step;
    }
    let _ = write!(
        s,
        r##"<line x1="{LEFT}" x2="{LEFT}" y1="{TOP}" y2="{b}" stroke="#000"/><line x1="{LEFT}" x2="{}" y1="{b}" y2="{b}" stroke="#000"/>"##,
        W - RIGHT,
        b = H - BOTTOM
    );
    let _ = write!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">seconds</text><text x="14" y="{}" transform="rotate(-90 14 {})" text-anchor="middle">latency (ms)</text>"#,
        (LEFT + W - RIGHT) / 2.0,
        H - 6.0,
        H / 2.0,
        H / 2.0
    );
    for (label, color, p99, ly) in [
        ("p50", "#1f77b4", false, TOP + 10.0),
        ("p99", "#d62728", true, TOP + 26.0),
    ] {
        let pts: Vec<String> = points
            .iter()
            .filter_map(|p| {
                let v = if p99 { p.2 } else { p.1 }?;
                Some(format!("{:.1},{:.1}", x(p.0 as f64), y(v)))
            })
            .collect();
        let _ = write!(
            s,
            r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#,
            pts.join(" ")
        );
        let _ = write!(
            s,
            r#"<line x1="{}" x2="{}" y1="{ly}" y2="{ly}" stroke="{color}" stroke-width="2"/><text x="{}" y="{}">{label}</text>"#,
            W - RIGHT - 70.0,
            W - RIGHT - 50.0,
            W - RIGHT - 44.0,
            ly + 4.0
        );
    }
    s.push_str("</svg>\n");
    s
}

/// 1, 2 or 5 times a power of ten, at least `v`.
fn nice_ceiling(v: f64) -> f64 {
    let p = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * p)
        .find(|c| *c >= v * 0.999_999)
        .unwrap_or(10.0 * p)
}

fn fmt_ms(v: f64) -> String {
    if v >= 10.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_both_lines() {
        let s = svg(
            "chat <test>",
            &[
                (1, Some(0.5), Some(1.5)),
                (2, None, None),
                (3, Some(0.7), Some(3.0)),
            ],
        );
        assert!(s.starts_with("<svg"));
        assert_eq!(s.matches("<polyline").count(), 2);
        assert!(s.contains("chat &lt;test&gt;"));
        assert_eq!(nice_ceiling(3.0), 5.0);
        assert!((nice_ceiling(0.013) - 0.02).abs() < 1e-9);
    }
}
