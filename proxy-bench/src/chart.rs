//! The results as a PNG: one bar panel per figure, (a) (b) (c) (d) side by side, each
//! panel's title saying the target for (c) and whether it was met. Text is drawn with an embedded
//! DejaVu Sans (the `dejavu` crate) through plotters' ab_glyph backend: no system font
//! library is involved.

use std::path::Path;

use plotters::{
    prelude::*,
    style::{
        FontStyle, register_font,
        text_anchor::{HPos, Pos, VPos},
    },
};

use crate::{
    report::{self, Meta, Results, Target},
    setup::Kind,
};

const WIDTH: u32 = 1800;
const HEIGHT: u32 = 1450;
const HEADER: u32 = 110;

fn color(kind: Kind) -> RGBColor {
    match kind {
        Kind::Routing => RGBColor(140, 140, 140),
        Kind::Iptables => RGBColor(232, 136, 36),
        Kind::Ebpf => RGBColor(36, 110, 200),
        Kind::Haproxy => RGBColor(60, 160, 90),
    }
}

/// A cluster of bars under one label.
struct Group {
    label: String,
    bars: Vec<(Kind, Option<f64>)>,
}

fn group(label: &str, bars: Vec<(Kind, Option<f64>)>) -> Group {
    Group {
        label: label.to_owned(),
        bars,
    }
}

struct Panel {
    title: String,
    /// One or two lines under the title.
    subtitle: Vec<String>,
    unit: &'static str,
    decimals: usize,
    groups: Vec<Group>,
    /// A dashed horizontal line (absolute targets).
    line: Option<f64>,
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;

fn err<E: std::fmt::Display>(e: E) -> String {
    format!("drawing the chart: {e}")
}

/// A round step for about five grid lines up to `max`.
fn nice_step(max: f64) -> f64 {
    let raw = max / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let norm = raw / mag;
    let nice = if norm <= 1.0 {
        1.0
    } else if norm <= 2.0 {
        2.0
    } else if norm <= 2.5 {
        2.5
    } else if norm <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * mag
}

fn axis_label(v: f64, step: f64) -> String {
    // As many decimals as the step needs (2.5 needs one, 0.25 two), so that no label is
    // rounded to its neighbour's value.
    let decimals = (0..2)
        .find(|&d| {
            let scaled = step * 10f64.powi(d);
            (scaled - scaled.round()).abs() < 1e-9
        })
        .unwrap_or(2) as usize;
    report::fmt_value(Some(v), decimals)
}

fn draw_panel(area: &Area<'_>, panel: &Panel) -> Result<(), String> {
    let (w, h) = area.dim_in_pixel();
    let (w, h) = (w as i32, h as i32);
    let title = ("sans-serif", 19, FontStyle::Bold)
        .into_font()
        .color(&BLACK);
    let small = ("sans-serif", 14).into_font().color(&BLACK);
    let grey = RGBColor(90, 90, 90);
    let small_grey = ("sans-serif", 14).into_font().color(&grey);
    area.draw(&Rectangle::new(
        [(4, 4), (w - 4, h - 4)],
        RGBColor(210, 210, 210).stroke_width(1),
    ))
    .map_err(err)?;
    area.draw_text(&panel.title, &title, (16, 12))
        .map_err(err)?;
    for (i, line) in panel.subtitle.iter().enumerate() {
        area.draw_text(line, &small_grey, (16, 38 + 18 * i as i32))
            .map_err(err)?;
    }

    let top = 90 + 18 * panel.subtitle.len().saturating_sub(1) as i32;
    let (left, right, bottom) = (78, w - 20, h - 48);
    let values: Vec<f64> = panel
        .groups
        .iter()
        .flat_map(|g| g.bars.iter().filter_map(|(_, v)| *v))
        .chain(panel.line)
        .collect();
    let max = values.iter().copied().fold(0.0, f64::max);
    let max = if max > 0.0 { max * 1.15 } else { 1.0 };
    let step = nice_step(max);
    let y_of = |v: f64| bottom - ((v / max) * f64::from(bottom - top)) as i32;

    // Grid and y labels.
    let mut tick = 0.0;
    for _ in 0..20 {
        if tick > max {
            break;
        }
        let y = y_of(tick);
        area.draw(&PathElement::new(
            vec![(left, y), (right, y)],
            RGBColor(228, 228, 228).stroke_width(1),
        ))
        .map_err(err)?;
        area.draw_text(
            &axis_label(tick, step),
            &small.pos(Pos::new(HPos::Right, VPos::Center)),
            (left - 8, y),
        )
        .map_err(err)?;
        tick += step;
    }
    area.draw_text(
        panel.unit,
        &small_grey.pos(Pos::new(HPos::Left, VPos::Bottom)),
        (12, top - 12),
    )
    .map_err(err)?;

    // Bars.
    let groups = panel.groups.len().max(1) as i32;
    let group_w = (right - left) / groups;
    for (gi, g) in panel.groups.iter().enumerate() {
        let gx = left + gi as i32 * group_w;
        let n = g.bars.len().max(1) as i32;
        let bar_w = (group_w * 8 / 10 / n).min(110);
        let used = bar_w * n;
        let x0 = gx + (group_w - used) / 2;
        for (bi, (kind, value)) in g.bars.iter().enumerate() {
            let bx = x0 + bi as i32 * bar_w;
            let (bx0, bx1) = (bx + 3, bx + bar_w - 3);
            match value {
                Some(v) => {
                    area.draw(&Rectangle::new(
                        [(bx0, y_of(*v)), (bx1, bottom)],
                        color(*kind).filled(),
                    ))
                    .map_err(err)?;
                    area.draw_text(
                        &report::fmt_value(Some(*v), panel.decimals),
                        &small.pos(Pos::new(HPos::Center, VPos::Bottom)),
                        ((bx0 + bx1) / 2, y_of(*v) - 4),
                    )
                    .map_err(err)?;
                }
                None => {
                    area.draw_text(
                        "n/a",
                        &small_grey.pos(Pos::new(HPos::Center, VPos::Bottom)),
                        ((bx0 + bx1) / 2, bottom - 4),
                    )
                    .map_err(err)?;
                }
            }
        }
        area.draw_text(
            &g.label,
            &small.pos(Pos::new(HPos::Center, VPos::Top)),
            (gx + group_w / 2, bottom + 10),
        )
        .map_err(err)?;
    }
    area.draw(&PathElement::new(
        vec![(left, bottom), (right, bottom)],
        BLACK.stroke_width(1),
    ))
    .map_err(err)?;
    if let Some(line) = panel.line {
        let y = y_of(line);
        let mut x = left;
        while x < right {
            area.draw(&PathElement::new(
                vec![(x, y), ((x + 10).min(right), y)],
                RED.stroke_width(2),
            ))
            .map_err(err)?;
            x += 18;
        }
        area.draw_text(
            &format!("target {line} {}", panel.unit),
            &("sans-serif", 14)
                .into_font()
                .color(&RED)
                .pos(Pos::new(HPos::Right, VPos::Bottom)),
            (right - 4, y - 4),
        )
        .map_err(err)?;
    }
    Ok(())
}

/// "(c)/(d) = 1.05; target >= 1.2 x (d): MISS", for `row`'s medians.
fn verdict_text(row: &report::Row<'_>) -> String {
    let (target, verdict) = row.judge();
    let reference = row.reference;
    let ratio = report::ratio(row.series.median(Kind::Ebpf), row.series.median(reference));
    match (row.target, ratio) {
        (Target::AtMost(_), _) => format!("target (c) {target}: {verdict}"),
        (_, Some(r)) => format!(
            "(c)/({}) = {r:.2}; target {target}: {verdict}",
            reference.letter()
        ),
        (_, None) => format!("target {target}: {verdict}"),
    }
}

pub fn draw(path: &Path, meta: &Meta, r: &Results) -> Result<(), String> {
    register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular())
        .map_err(|_| "embedded font rejected".to_owned())?;
    register_font("sans-serif", FontStyle::Bold, dejavu::sans::bold())
        .map_err(|_| "embedded font rejected".to_owned())?;
    let root = BitMapBackend::new(path, (WIDTH, HEIGHT)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let (header, body) = root.split_vertically(HEADER);

    header
        .draw_text(
            "proxy benchmark: (a) routing, (b) iptables TPROXY -> proxy, (c) eBPF classifier -> proxy, (d) iptables TPROXY -> HAProxy",
            &("sans-serif", 26, FontStyle::Bold).into_font().color(&BLACK),
            (16, 12),
        )
        .map_err(err)?;
    header
        .draw_text(
            &format!(
                "{} cores, kernel {}, {} ({} run, medians of {} runs); load average {} -> {}",
                meta.cores,
                meta.kernel,
                meta.date(),
                meta.mode(),
                meta.runs,
                meta.load_before,
                meta.load_after
            ),
            &("sans-serif", 16).into_font().color(&RGBColor(60, 60, 60)),
            (16, 48),
        )
        .map_err(err)?;
    let mut x = 16;
    for kind in Kind::ALL {
        header
            .draw(&Rectangle::new(
                [(x, 80), (x + 18, 98)],
                color(kind).filled(),
            ))
            .map_err(err)?;
        header
            .draw_text(
                kind.label(),
                &("sans-serif", 16).into_font().color(&BLACK),
                (x + 26, 80),
            )
            .map_err(err)?;
        x += 430;
    }

    let (b, c, d) = (Kind::Iptables, Kind::Ebpf, Kind::Haproxy);
    let mut panels = Vec::new();
    for row in report::rows(r).into_iter().take(3) {
        panels.push(Panel {
            title: format!("{} ({})", row.short, row.unit),
            subtitle: vec![verdict_text(&row)],
            unit: row.unit,
            decimals: row.decimals,
            groups: Kind::ALL
                .map(|k| group(k.short(), vec![(k, row.series.median(k))]))
                .into(),
            line: None,
        });
    }
    let rows = report::rows(r);
    let (p50, p99, rss) = (&rows[3], &rows[4], &rows[5]);
    panels.push(Panel {
        title: "Latency, 64 B request/response (us)".into(),
        subtitle: vec![
            format!("p50 {}", verdict_text(p50)),
            format!("p99 {}", verdict_text(p99)),
        ],
        unit: "us",
        decimals: 1,
        groups: [("p50", p50), ("p99", p99)]
            .into_iter()
            .map(|(label, row)| group(label, Kind::ALL.map(|k| (k, row.series.median(k))).to_vec()))
            .collect(),
        line: None,
    });
    panels.push(Panel {
        title: "Proxy RSS per idle proxied connection (KiB)".into(),
        subtitle: {
            let mut lines = vec![verdict_text(rss)];
            let samples: Vec<_> = r.rss_samples.iter().flatten().collect();
            if let (Some(min), Some(max)) = (
                samples.iter().map(|s| s.opened).min(),
                samples.iter().map(|s| s.opened).max(),
            ) {
                let range = if min == max {
                    report::fmt_value(Some(min as f64), 0)
                } else {
                    format!(
                        "{} to {}",
                        report::fmt_value(Some(min as f64), 0),
                        report::fmt_value(Some(max as f64), 0)
                    )
                };
                lines.push(if samples.iter().any(|s| s.opened < s.wanted) {
                    format!("at {range} idle connections (open-files limit, see report)")
                } else {
                    format!("at {range} idle connections")
                });
            }
            lines
        },
        unit: "KiB",
        decimals: 1,
        groups: [b, c, d]
            .map(|k| group(k.short(), vec![(k, rss.series.median(k))]))
            .into(),
        line: match rss.target {
            Target::AtMost(x) => Some(x),
            _ => None,
        },
    });
    let last = r.rules.len() - 1;
    let (c1, cn) = (r.rules[0].median(c), r.rules[last].median(c));
    panels.push(Panel {
        title: "New connections/s vs number of rules".into(),
        subtitle: vec![format!(
            "(c) {} rules / 1 rule = {}; target >= 0.95: {}",
            report::fmt_value(Some(r.rule_counts[last] as f64), 0),
            report::ratio(cn, c1).map_or_else(|| "n/a".into(), |x| format!("{x:.2}")),
            report::RULES_TARGET.verdict(cn, c1)
        )],
        unit: "conn/s",
        decimals: 0,
        groups: r
            .rule_counts
            .iter()
            .zip(&r.rules)
            .map(|(n, series)| {
                group(
                    &format!("{} rule(s)", report::fmt_value(Some(*n as f64), 0)),
                    vec![(b, series.median(b)), (c, series.median(c))],
                )
            })
            .collect(),
        line: None,
    });

    panels.push(passthrough_panel(r));
    panels.push(udp_throughput_panel(r));

    for (area, panel) in body.split_evenly((3, 3)).iter().zip(&panels) {
        draw_panel(area, panel)?;
    }
    root.present().map_err(err)?;
    Ok(())
}

/// Pass-through: (c)/(a) per protocol (the median of the per-run ratios), against the
/// target's line.
fn passthrough_panel(r: &Results) -> Panel {
    let (a, c) = (Kind::Routing, Kind::Ebpf);
    let target = report::PASSTHROUGH_TARGET;
    let [tcp, udp] = [&r.passthrough_tcp, &r.passthrough_udp].map(|s| s.paired_ratio(c, a));
    let verdicts = [("TCP", tcp), ("UDP", udp)]
        .map(|(name, v)| format!("{name} {}", target.verdict(v, Some(1.0))))
        .join(", ");
    Panel {
        title: "Pass-through: no rule matches, (c) / (a)".into(),
        subtitle: vec![
            format!("agent attached / no agent, port 81; median of per-run ratios"),
            format!("target {}: {verdicts}", target.describe("(a)", "")),
        ],
        unit: "x (a)",
        decimals: 3,
        groups: vec![
            group("TCP, 1 stream", vec![(c, tcp)]),
            group("UDP, 1 flow", vec![(c, udp)]),
        ],
        line: match target {
            Target::RatioAtLeast(x) => Some(x),
            _ => None,
        },
    }
}

/// UDP throughput: thousands of datagrams/s received, routed and proxied, per flow count.
fn udp_throughput_panel(r: &Results) -> Panel {
    let (a, c) = (Kind::Routing, Kind::Ebpf);
    let (va, vc) = (r.udp_rate[0].median(a), r.udp_rate[0].median(c));
    let target = report::UDP_RATE_TARGET;
    let ratio = report::ratio(vc, va).map_or_else(|| "n/a".into(), |x| format!("{x:.2}"));
    let loss = |i: usize, k: Kind| {
        r.udp_loss[i]
            .median(k)
            .map_or_else(|| "n/a".into(), |l| format!("{l:.0}%"))
    };
    Panel {
        title: "UDP, 1,200 B datagrams received (k/s)".into(),
        subtitle: vec![
            format!(
                "1 flow (c)/(a) = {ratio}; target {}: {}",
                target.describe("(a)", ""),
                target.verdict(vc, va)
            ),
            r.udp_flows
                .iter()
                .enumerate()
                .map(|(i, f)| format!("loss, {f} flow(s): (a) {}, (c) {}", loss(i, a), loss(i, c)))
                .collect::<Vec<_>>()
                .join("; "),
        ],
        unit: "k/s",
        decimals: 0,
        groups: r
            .udp_flows
            .iter()
            .zip(&r.udp_rate)
            .map(|(flows, series)| {
                group(
                    &format!("{flows} flow(s)"),
                    [a, c]
                        .map(|k| (k, series.median(k).map(|x| x / 1e3)))
                        .to_vec(),
                )
            })
            .collect(),
        line: None,
    }
}
