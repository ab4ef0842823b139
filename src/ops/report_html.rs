//! `switchyard report --html FILE`: the report as one self-contained page
//! (inline CSS and SVG, no script, no external resource), readable offline.
//! Pure: a [`Report`] in, a string out.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use rust_decimal::prelude::ToPrimitive;
use rust_decimal::Decimal;

use crate::ops::report::{Overhead, Report};

/// Colours for series, in order (colour-blind-friendly palette).
const COLOURS: [&str; 8] = [
    "#4269d0", "#efb118", "#ff725c", "#6cc5b0", "#3ca951", "#ff8ab7", "#a463f2", "#97bbf5",
];

/// Escape text for HTML and SVG.
pub fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

fn usd(d: Decimal) -> String {
    format!("${}", d.round_dp(6))
}

fn f(d: Decimal) -> f64 {
    d.to_f64().unwrap_or(0.0)
}

/// A "nice" axis maximum at or above `v`.
fn nice_max(v: f64) -> f64 {
    if v <= 0.0 {
        return 1.0;
    }
    let mag = 10f64.powf(v.log10().floor());
    for m in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if m * mag >= v {
            return m * mag;
        }
    }
    10.0 * mag
}

/// One colour per model, the same in every chart.
fn colour_of(r: &Report, model: &str) -> &'static str {
    let mut all: Vec<&str> = r
        .daily_spend
        .iter()
        .map(|d| d.model.as_str())
        .chain(r.served_by.iter().map(|s| s.model.as_str()))
        .chain(r.latency_by_model.iter().map(|l| l.model.as_str()))
        .collect();
    all.sort_unstable();
    all.dedup();
    let i = all.iter().position(|m| *m == model).unwrap_or(0);
    COLOURS[i % COLOURS.len()]
}

fn legend(
    out: &mut String,
    names: &[String],
    colour: impl Fn(usize, &str) -> &'static str,
    x: f64,
    y: f64,
) {
    for (i, n) in names.iter().enumerate() {
        let yy = y + 18.0 * i as f64;
        let _ = write!(
            out,
            r#"<rect x="{x}" y="{}" width="12" height="12" fill="{}"/><text x="{}" y="{}" class="l">{}</text>"#,
            yy,
            colour(i, n),
            x + 18.0,
            yy + 10.5,
            esc(n)
        );
    }
}

/// Five horizontal grid lines with their values, 0 to `max`, for the plot
/// area (left, top, width, height).
fn grid(
    o: &mut String,
    (left, top, w, h): (f64, f64, f64, f64),
    max: f64,
    label: impl Fn(f64) -> String,
) {
    for i in 0..=4 {
        let v = max * f64::from(i) / 4.0;
        let y = top + h - h * f64::from(i) / 4.0;
        let _ = write!(
            o,
            r##"<line x1="{left}" x2="{}" y1="{y}" y2="{y}" stroke="#ddd"/><text x="{}" y="{}" class="a" text-anchor="end">{}</text>"##,
            left + w,
            left - 6.0,
            y + 4.0,
            esc(&label(v))
        );
    }
}

/// Stacked bars: USD per day, one colour per model.
fn spend_chart(r: &Report) -> String {
    let mut days: BTreeMap<&str, BTreeMap<&str, Decimal>> = BTreeMap::new();
    let mut models: Vec<String> = Vec::new();
    for d in &r.daily_spend {
        *days
            .entry(d.day.as_str())
            .or_default()
            .entry(d.model.as_str())
            .or_default() += d.cost_usd;
        if !models.contains(&d.model) {
            models.push(d.model.clone());
        }
    }
    models.sort();
    if days.is_empty() {
        return "<p class=\"empty\">No calls in this window.</p>".into();
    }
    let (w, h, left, top, bottom) = (760.0, 300.0, 70.0, 20.0, 50.0);
    let plot_w = w - left - 200.0;
    let plot_h = h - top - bottom;
    let max = days
        .values()
        .map(|m| m.values().map(|v| f(*v)).sum::<f64>())
        .fold(0.0, f64::max);
    let top_usd = nice_max(max);
    let slot = plot_w / days.len() as f64;
    let bar = (slot * 0.7).clamp(1.0, 48.0);
    let mut o = format!(
        r#"<svg class="chart" role="img" aria-label="Spend by model per day" viewBox="0 0 {w} {h}" width="{w}" height="{h}">"#
    );
    grid(&mut o, (left, top, plot_w, plot_h), top_usd, |v| {
        format!("${v:.4}")
    });
    let label_every = (days.len() / 8).max(1);
    for (i, (day, by_model)) in days.iter().enumerate() {
        let x = left + slot * i as f64 + (slot - bar) / 2.0;
        let mut y = top + plot_h;
        for m in &models {
            let Some(v) = by_model.get(m.as_str()) else {
                continue;
            };
            let bh = plot_h * f(*v) / top_usd;
            y -= bh;
            let _ = write!(
                o,
                r#"<rect class="bar" x="{x:.1}" y="{y:.1}" width="{bar:.1}" height="{bh:.1}" fill="{}"><title>{} {}: {}</title></rect>"#,
                colour_of(r, m),
                esc(day),
                esc(m),
                usd(*v)
            );
        }
        if i % label_every == 0 {
            let _ = write!(
                o,
                r#"<text x="{:.1}" y="{}" class="a" text-anchor="middle">{}</text>"#,
                x + bar / 2.0,
                top + plot_h + 16.0,
                esc(day)
            );
        }
    }
    legend(
        &mut o,
        &models,
        |_, m| colour_of(r, m),
        left + plot_w + 20.0,
        top,
    );
    o.push_str("</svg>");
    o
}

/// Horizontal 100% bars: which models served each category's results.
fn usage_chart(r: &Report) -> String {
    let mut cats: BTreeMap<&str, Vec<(&str, f64, i64)>> = BTreeMap::new();
    let mut models: Vec<String> = Vec::new();
    for s in &r.served_by {
        cats.entry(s.category.as_str())
            .or_default()
            .push((s.model.as_str(), s.share, s.jobs));
        if !models.contains(&s.model) {
            models.push(s.model.clone());
        }
    }
    models.sort();
    if cats.is_empty() {
        return "<p class=\"empty\">No results in this window.</p>".into();
    }
    let (left, plot_w, row) = (110.0, 450.0, 28.0);
    let h = 20.0 + row * cats.len() as f64 + 18.0 * models.len().saturating_sub(cats.len()) as f64;
    let w = left + plot_w + 220.0;
    let mut o = format!(
        r#"<svg class="chart" role="img" aria-label="Usage distribution per category" viewBox="0 0 {w} {h}" width="{w}" height="{h}">"#
    );
    for (i, (cat, parts)) in cats.iter().enumerate() {
        let y = 10.0 + row * i as f64;
        let _ = write!(
            o,
            r#"<text x="{}" y="{}" class="a" text-anchor="end">{}</text>"#,
            left - 8.0,
            y + 14.0,
            esc(cat)
        );
        let mut x = left;
        for (model, share, jobs) in parts {
            let bw = plot_w * share;
            let _ = write!(
                o,
                r#"<rect class="bar" x="{x:.1}" y="{y}" width="{bw:.1}" height="20" fill="{}"><title>{} {}: {} results ({:.1}%)</title></rect>"#,
                colour_of(r, model),
                esc(cat),
                esc(model),
                jobs,
                100.0 * share
            );
            x += bw;
        }
    }
    legend(
        &mut o,
        &models,
        |_, m| colour_of(r, m),
        left + plot_w + 20.0,
        10.0,
    );
    o.push_str("</svg>");
    o
}

/// Grouped bars: p50, p95, p99 provider latency per model.
fn latency_chart(r: &Report) -> String {
    if r.latency_by_model.is_empty() {
        return "<p class=\"empty\">No answered calls in this window.</p>".into();
    }
    let (w, h, left, top, bottom) = (760.0, 300.0, 70.0, 20.0, 70.0);
    let plot_w = w - left - 120.0;
    let plot_h = h - top - bottom;
    let max = r
        .latency_by_model
        .iter()
        .map(|l| l.p99_ms)
        .fold(0.0, f64::max);
    let top_ms = nice_max(max);
    let slot = plot_w / r.latency_by_model.len() as f64;
    let bar = (slot * 0.8 / 3.0).max(1.0);
    let mut o = format!(
        r#"<svg class="chart" role="img" aria-label="Latency percentiles per model" viewBox="0 0 {w} {h}" width="{w}" height="{h}">"#
    );
    grid(&mut o, (left, top, plot_w, plot_h), top_ms, |v| {
        format!("{v:.0} ms")
    });
    for (i, l) in r.latency_by_model.iter().enumerate() {
        let x0 = left + slot * i as f64 + slot * 0.1;
        for (k, (name, v)) in [("p50", l.p50_ms), ("p95", l.p95_ms), ("p99", l.p99_ms)]
            .into_iter()
            .enumerate()
        {
            let bh = plot_h * v / top_ms;
            let _ = write!(
                o,
                r#"<rect class="bar" x="{:.1}" y="{:.1}" width="{bar:.1}" height="{bh:.1}" fill="{}"><title>{} {name}: {v:.0} ms</title></rect>"#,
                x0 + bar * k as f64,
                top + plot_h - bh,
                COLOURS[k],
                esc(&l.model)
            );
        }
        let _ = write!(
            o,
            r#"<text x="{:.1}" y="{}" class="a" text-anchor="end" transform="rotate(-30 {:.1} {})">{}</text>"#,
            x0 + bar * 1.5,
            top + plot_h + 14.0,
            x0 + bar * 1.5,
            top + plot_h + 14.0,
            esc(&l.model)
        );
    }
    legend(
        &mut o,
        &["p50".into(), "p95".into(), "p99".into()],
        |i, _| COLOURS[i],
        left + plot_w + 20.0,
        top,
    );
    o.push_str("</svg>");
    o
}

fn table(out: &mut String, head: &[&str], rows: Vec<Vec<String>>) {
    out.push_str("<table><tr>");
    for h in head {
        let _ = write!(out, "<th>{}</th>", esc(h));
    }
    out.push_str("</tr>");
    for r in rows {
        out.push_str("<tr>");
        for c in r {
            let _ = write!(out, "<td>{}</td>", esc(&c));
        }
        out.push_str("</tr>");
    }
    out.push_str("</table>");
}

/// The whole page.
pub fn render(r: &Report) -> String {
    let mut o = String::from(
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Switchyard report</title><style>
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:1000px}
h1{font-size:22px}h2{font-size:17px;margin-top:28px}
table{border-collapse:collapse;margin:8px 0}td,th{padding:3px 10px;border-bottom:1px solid #e4e4e4;text-align:right}
td:first-child,th:first-child{text-align:left}.a,.l{font-size:11px;fill:#444}.l{font-size:12px}
.kpi{display:inline-block;margin:0 24px 8px 0}.kpi b{display:block;font-size:22px}.empty{color:#888}
</style></head><body><h1>Switchyard report</h1>"#,
    );
    let mut scope = Vec::new();
    if let Some(s) = &r.since {
        scope.push(format!("since {s}"));
    }
    if let Some(u) = &r.until {
        scope.push(format!("until {u}"));
    }
    if let Some(c) = &r.category {
        scope.push(format!("category {c}"));
    }
    if let Some(p) = &r.job_prefix {
        scope.push(format!("jobs {p}*"));
    }
    let _ = write!(
        o,
        "<p>{}</p>",
        esc(&if scope.is_empty() {
            "All jobs and calls.".to_string()
        } else {
            scope.join(", ")
        })
    );
    let kpi = |o: &mut String, label: &str, value: String| {
        let _ = write!(
            o,
            r#"<div class="kpi">{}<b>{}</b></div>"#,
            esc(label),
            esc(&value)
        );
    };
    kpi(&mut o, "jobs", r.total_jobs().to_string());
    kpi(
        &mut o,
        "succeeded",
        r.jobs_with_status("succeeded").to_string(),
    );
    kpi(&mut o, "provider calls", r.total.calls.to_string());
    kpi(&mut o, "spent", usd(r.total.cost_usd));
    if let (Some(m), Some(b), Some(s)) = (&r.baseline_model, r.baseline_cost_usd, r.savings_usd) {
        kpi(&mut o, &format!("one {m} call per job"), usd(b));
        kpi(&mut o, "saved", usd(s));
    }
    kpi(
        &mut o,
        "spent on jobs without a result",
        usd(r.savings_total.no_result_cost_usd),
    );
    o.push_str("<h2>Spend by model per day (UTC)</h2>");
    o.push_str(&spend_chart(r));
    o.push_str("<h2>Which models served each category</h2>");
    o.push_str(&usage_chart(r));
    o.push_str("<h2>Provider latency per model (answered calls)</h2>");
    o.push_str(&latency_chart(r));
    savings_tables(&mut o, r);
    o.push_str("<h2>Routes</h2>");
    table(
        &mut o,
        &[
            "category",
            "variant",
            "kind",
            "jobs",
            "succeeded",
            "failed",
            "review",
            "fell back",
            "USD/job",
        ],
        r.routes
            .iter()
            .map(|l| {
                vec![
                    l.category.clone(),
                    l.variant.clone(),
                    l.kind.clone(),
                    l.jobs.to_string(),
                    l.succeeded.to_string(),
                    l.failed.to_string(),
                    l.reviewed.to_string(),
                    l.fell_back.to_string(),
                    usd(l.cost_per_job),
                ]
            })
            .collect(),
    );
    o.push_str("<h2>Cost by model</h2>");
    table(
        &mut o,
        &[
            "model",
            "calls",
            "ok",
            "input tokens",
            "output tokens",
            "USD",
        ],
        r.by_model
            .iter()
            .chain(std::iter::once(&r.total))
            .map(|l| {
                vec![
                    l.key.clone(),
                    l.calls.to_string(),
                    l.ok_calls.to_string(),
                    l.input_tokens.to_string(),
                    l.output_tokens.to_string(),
                    usd(l.cost_usd),
                ]
            })
            .collect(),
    );
    o.push_str("</body></html>\n");
    o
}

/// Savings against one baseline call per job, where the money went, what
/// the routes bought and what every model alone would have cost.
fn savings_tables(o: &mut String, r: &Report) {
    let lines = || {
        r.savings_by_category
            .iter()
            .chain(std::iter::once(&r.savings_total))
    };
    let opt = |d: Option<Decimal>| d.map_or("-".to_string(), usd);
    if let Some(m) = &r.baseline_model {
        let _ = write!(
            o,
            "<h2>Savings against one {} call per answered job</h2>",
            esc(m)
        );
        table(
            o,
            &["category", "jobs", "actual", "baseline", "saved", "cost ×"],
            lines()
                .map(|l| {
                    vec![
                        l.category.clone(),
                        l.jobs.to_string(),
                        usd(l.actual_cost_usd),
                        opt(l.baseline_cost_usd),
                        opt(l.savings_usd),
                        l.cost_ratio.map_or("-".into(), |x| format!("{x:.2}")),
                    ]
                })
                .collect(),
        );
    }
    o.push_str("<h2>Where the answered jobs' money went</h2>");
    let mut head = vec!["category", "answer"];
    head.extend(Overhead::default().parts().map(|(name, _)| name));
    head.push("overhead");
    table(
        o,
        &head,
        lines()
            .map(|l| {
                let mut row = vec![l.category.clone(), usd(l.answer_cost_usd)];
                row.extend(l.overhead.parts().map(|(_, v)| usd(v)));
                row.push(usd(l.overhead_cost_usd));
                row
            })
            .collect(),
    );
    o.push_str("<h2>What the routes bought, and what was spent apart</h2>");
    table(
        o,
        &[
            "category",
            "jobs",
            "fell back",
            "reviewed",
            "ratings",
            "mean score",
            "resolved by a person",
            "their cost",
            "without a result",
            "their cost",
        ],
        lines()
            .map(|l| {
                vec![
                    l.category.clone(),
                    l.all_jobs.to_string(),
                    format!("{:.1}%", 100.0 * l.fallback_rate),
                    format!("{:.1}%", 100.0 * l.review_rate),
                    l.ratings.to_string(),
                    l.avg_score.map_or("-".into(), |x| format!("{x:.2}")),
                    l.person_jobs.to_string(),
                    usd(l.person_cost_usd),
                    l.no_result_jobs.to_string(),
                    usd(l.no_result_cost_usd),
                ]
            })
            .collect(),
    );
    if r.batch_by_category.iter().any(|l| l.batched_calls > 0) {
        o.push_str("<h2>Through the providers' batch APIs (half price)</h2>");
        table(
            o,
            &[
                "category / model",
                "calls",
                "batched",
                "share",
                "batched cost",
                "real-time equivalent",
                "saved",
            ],
            r.batch_by_category
                .iter()
                .chain(&r.batch_by_model)
                .filter(|l| l.batched_calls > 0)
                .map(|l| {
                    vec![
                        l.key.clone(),
                        l.calls.to_string(),
                        l.batched_calls.to_string(),
                        format!("{:.1}%", 100.0 * l.batched_share),
                        usd(l.batched_cost_usd),
                        usd(l.realtime_equivalent_usd),
                        usd(l.saved_usd),
                    ]
                })
                .collect(),
        );
    }
    if r.what_if.is_empty() {
        return;
    }
    o.push_str("<h2>What if one model alone had served each category</h2>");
    table(
        o,
        &[
            "category",
            "model",
            "jobs",
            "as routed",
            "that model alone",
            "saved by routing",
        ],
        r.what_if
            .iter()
            .map(|w| {
                vec![
                    w.category.clone(),
                    w.model.clone(),
                    w.jobs.to_string(),
                    usd(w.actual_cost_usd),
                    usd(w.cost_usd),
                    usd(w.savings_usd),
                ]
            })
            .collect(),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped_and_axes_are_nice() {
        assert_eq!(
            esc(r#"<a href="x">&'"#),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
        assert_eq!(nice_max(0.0), 1.0);
        assert_eq!(nice_max(0.013), 0.02);
        assert_eq!(nice_max(7.0), 10.0);
        assert_eq!(nice_max(240.0), 250.0);
    }
}
