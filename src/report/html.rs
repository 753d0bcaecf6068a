//! `mdl report RUN_DIR... --html OUT.html`: one self-contained HTML page (no script, no
//! network) comparing finished runs, its plots SVG drawn by the `plotters` crate:
//!
//! - the metrics table (the Markdown report's columns);
//! - the learning curve of every task (valid AUC at each evaluation, `curve_tasks.csv`),
//!   one plot per task, a line per run;
//! - the training loss of every step (`loss.csv`), a line per run;
//! - the test AUC per domain of every task (`metrics.json`), for runs with domains;
//! - from `analysis.json` (`mdl analyze`), where a run has one: the singular spectra of
//!   its embedding tables and the mean weights of its gates (overall and in the 5 largest
//!   domains), and the mutual-information heat maps of `--mi` (behaviour category ×
//!   target-relative position);
//! - where a run recorded them (`train.record_grad_norms`, `train.grad_cosine`): its
//!   gradient norm per parameter group and step, and the cosine between two losses'
//!   gradients per step.
//!
//! Files a run of an older mdl lacks (`curve_tasks.csv`, `loss.csv`) leave their plot out
//! for that run; each file read is checked against the run folder's manifest.

use super::{read_checked, summarize, RunSummary};
use plotters::coord::ranged1d::SegmentValue;
use plotters::prelude::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

const WIDTH: u32 = 720;
const HEIGHT: u32 = 360;

/// One run's series, as the page plots them.
struct RunSeries {
    summary: RunSummary,
    /// Valid AUC per task: (step, value), in step order.
    curves: BTreeMap<String, Vec<(f64, f64)>>,
    /// Training loss: (step, value).
    loss: Vec<(f64, f64)>,
    /// Test AUC per task per domain id.
    domain_auc: BTreeMap<String, BTreeMap<String, f64>>,
    /// `analysis.json`, when `mdl analyze` wrote one.
    analysis: Option<Value>,
    /// Gradient norms per group (`grad_norms.csv`): (step, norm), in group order.
    grad_norms: Vec<(String, Vec<(f64, f64)>)>,
    /// `grad_cosine.csv`: its losses and parameter, and (step, cosine) of the steps with one.
    grad_cosine: Option<(String, Vec<(f64, f64)>)>,
}

/// A text file of a run folder, checked against its manifest; `None` when absent.
fn read_text(folder: &Path, name: &str) -> Result<Option<String>, String> {
    let path = folder.join(name);
    if !path.exists() {
        return Ok(None);
    }
    let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    crate::train::folder::check_recorded(folder, name, &bytes)?;
    String::from_utf8(bytes).map(Some).map_err(|e| format!("{}: {e}", path.display()))
}

/// The rows of a CSV file the run wrote, as maps from its header's names.
fn csv_rows(folder: &Path, name: &str) -> Result<Vec<BTreeMap<String, String>>, String> {
    let Some(text) = read_text(folder, name)? else {
        return Ok(Vec::new());
    };
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap_or("").split(',').collect();
    let mut rows = Vec::new();
    for (i, line) in lines.enumerate() {
        let cells: Vec<&str> = line.split(',').collect();
        if cells.len() != header.len() {
            return Err(format!(
                "{}:{}: {} cells, the header has {}",
                folder.join(name).display(),
                i + 2,
                cells.len(),
                header.len()
            ));
        }
        rows.push(header.iter().map(|h| h.to_string()).zip(cells.into_iter().map(str::to_string)).collect());
    }
    Ok(rows)
}

fn number(folder: &Path, name: &str, row: &BTreeMap<String, String>, key: &str) -> Result<f64, String> {
    let cell = row.get(key).map(String::as_str).unwrap_or("");
    cell.parse().map_err(|_| format!("{}: `{key}` is not a number: `{cell}`", folder.join(name).display()))
}

fn read_run(folder: &Path) -> Result<RunSeries, String> {
    let summary = summarize(folder)?;
    let mut curves: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for r in csv_rows(folder, "curve_tasks.csv")? {
        if r.get("metric").map(String::as_str) == Some("auc") && r.get("domain").is_some_and(|d| d.is_empty()) {
            let point =
                (number(folder, "curve_tasks.csv", &r, "step")?, number(folder, "curve_tasks.csv", &r, "value")?);
            curves.entry(r.get("task").cloned().unwrap_or_default()).or_default().push(point);
        }
    }
    let mut loss = Vec::new();
    for r in csv_rows(folder, "loss.csv")? {
        loss.push((number(folder, "loss.csv", &r, "step")?, number(folder, "loss.csv", &r, "loss")?));
    }
    let metrics = read_checked(folder, "metrics.json")?;
    let mut domain_auc = BTreeMap::new();
    if let Some(tasks) = metrics["test"]["per_task"].as_object() {
        for (task, m) in tasks {
            let per: BTreeMap<String, f64> = m["per_domain"]
                .as_object()
                .map(|d| d.iter().filter_map(|(id, v)| v["auc"].as_f64().map(|a| (id.clone(), a))).collect())
                .unwrap_or_default();
            if !per.is_empty() {
                domain_auc.insert(task.clone(), per);
            }
        }
    }
    let analysis = match read_text(folder, "analysis.json")? {
        Some(text) => Some(
            serde_json::from_str(&text)
                .map_err(|e| format!("{}: not valid JSON: {e}", folder.join("analysis.json").display()))?,
        ),
        None => None,
    };
    let mut grad_norms: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    for r in csv_rows(folder, "grad_norms.csv")? {
        let point = (number(folder, "grad_norms.csv", &r, "step")?, number(folder, "grad_norms.csv", &r, "norm")?);
        let group = r.get("group").cloned().unwrap_or_default();
        match grad_norms.iter_mut().find(|(g, _)| *g == group) {
            Some((_, points)) => points.push(point),
            None => grad_norms.push((group, vec![point])),
        }
    }
    let cosine_rows = csv_rows(folder, "grad_cosine.csv")?;
    let grad_cosine = match cosine_rows.first() {
        Some(first) => {
            let field = |k: &str| first.get(k).cloned().unwrap_or_default();
            // Files written before paths name the losses `loss_a`, `loss_b`.
            let name = |new: &str, old: &str| first.get(new).or_else(|| first.get(old)).cloned().unwrap_or_default();
            let of = if field("of") == "paths" { "paths " } else { "" };
            let title = format!("{of}`{}` vs `{}` on {}", name("a", "loss_a"), name("b", "loss_b"), field("param"));
            let mut points = Vec::new();
            for r in cosine_rows.iter().filter(|r| r.get("cosine").is_some_and(|c| !c.is_empty())) {
                points.push((
                    number(folder, "grad_cosine.csv", r, "step")?,
                    number(folder, "grad_cosine.csv", r, "cosine")?,
                ));
            }
            Some((title, points))
        }
        None => None,
    };
    Ok(RunSeries { summary, curves, loss, domain_auc, analysis, grad_norms, grad_cosine })
}

/// The gradient plots of the runs that recorded them: the norm of each parameter group
/// per step (log scale), and the cosine between two losses' gradients per step.
fn gradient_plots(runs: &[RunSeries], page: &mut String) -> Result<(), String> {
    for r in runs.iter().filter(|r| !r.grad_norms.is_empty() || r.grad_cosine.is_some()) {
        let _ = writeln!(page, "<h3>{}</h3>", escape(&r.summary.model));
        if !r.grad_norms.is_empty() {
            let log: Vec<(String, Vec<(f64, f64)>)> = r
                .grad_norms
                .iter()
                .map(|(g, points)| {
                    (g.clone(), points.iter().filter(|p| p.1 > 0.0).map(|&(x, y)| (x, y.log10())).collect())
                })
                .collect();
            page.push_str(&line_plot("Gradient norm per parameter group", "step", "log10 gradient norm", &log)?);
        }
        if let Some((title, points)) = &r.grad_cosine {
            let negative = points.iter().filter(|p| p.1 < 0.0).count();
            let title = format!("Gradient cosine, {title} ({negative} of {} negative)", points.len());
            page.push_str(&line_plot(&title, "step", "cosine", &[("cosine".to_string(), points.clone())])?);
        }
    }
    Ok(())
}

/// Text for HTML.
fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

fn color(i: usize) -> RGBColor {
    // A colour-blind-safe palette (Okabe–Ito), then plotters' own.
    const OKABE_ITO: [(u8, u8, u8); 7] =
        [(0, 114, 178), (230, 159, 0), (0, 158, 115), (204, 121, 167), (86, 180, 233), (213, 94, 0), (0, 0, 0)];
    match OKABE_ITO.get(i) {
        Some(&(r, g, b)) => RGBColor(r, g, b),
        None => {
            let c = Palette99::pick(i).to_rgba();
            RGBColor(c.0, c.1, c.2)
        }
    }
}

/// The range of values with a margin (a flat series gets a unit range).
fn span(values: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    let (lo, hi) =
        values.filter(|v| v.is_finite()).fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(v), b.max(v)));
    if lo > hi {
        return None;
    }
    let pad = if hi > lo { (hi - lo) * 0.05 } else { 0.5 };
    Some((lo - pad, hi + pad))
}

fn plot_err<E: std::error::Error + Send + Sync>(e: DrawingAreaErrorKind<E>) -> String {
    format!("cannot draw a plot: {e}")
}

/// A line plot of named series: one `<svg>`.
fn line_plot(title: &str, x_desc: &str, y_desc: &str, series: &[(String, Vec<(f64, f64)>)]) -> Result<String, String> {
    let all = || series.iter().flat_map(|(_, p)| p.iter());
    let (Some((x0, x1)), Some((y0, y1))) = (span(all().map(|p| p.0)), span(all().map(|p| p.1))) else {
        return Ok(String::new());
    };
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(plot_err)?;
        chart.configure_mesh().x_desc(x_desc).y_desc(y_desc).draw().map_err(plot_err)?;
        for (i, (name, points)) in series.iter().enumerate() {
            let c = color(i);
            chart
                .draw_series(LineSeries::new(points.iter().copied(), c.stroke_width(2)))
                .map_err(plot_err)?
                .label(name.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
            if points.len() <= 60 {
                chart.draw_series(points.iter().map(|&p| Circle::new(p, 3, c.filled()))).map_err(plot_err)?;
            }
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(plot_err)?;
        root.present().map_err(plot_err)?;
    }
    Ok(svg)
}

/// Grouped bars: `groups` along x, in each a bar per named series (its value per group).
fn bar_plot(
    title: &str,
    x_desc: &str,
    y_desc: &str,
    groups: &[String],
    series: &[(String, Vec<Option<f64>>)],
) -> Result<String, String> {
    let values = series.iter().flat_map(|(_, v)| v.iter().flatten().copied());
    let Some((lo, hi)) = span(values) else {
        return Ok(String::new());
    };
    let lo = lo.min(0.0).max(if lo > 0.4 { lo - 0.05 } else { 0.0 });
    let per = series.len() + 1;
    let slots = (groups.len() * per) as i32;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d((0..slots).into_segmented(), lo..hi)
            .map_err(plot_err)?;
        let label = |v: &SegmentValue<i32>| match v {
            SegmentValue::CenterOf(i) | SegmentValue::Exact(i)
                if *i >= 0 && (*i as usize) % per == series.len() / 2 =>
            {
                groups.get(*i as usize / per).cloned().unwrap_or_default()
            }
            _ => String::new(),
        };
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(slots as usize)
            .x_label_formatter(&label)
            .x_desc(x_desc)
            .y_desc(y_desc)
            .draw()
            .map_err(plot_err)?;
        for (j, (name, vals)) in series.iter().enumerate() {
            let c = color(j);
            let bars = vals.iter().enumerate().filter_map(|(g, v)| {
                let x = (g * per + j) as i32;
                v.map(|v| Rectangle::new([(SegmentValue::Exact(x), lo), (SegmentValue::Exact(x + 1), v)], c.filled()))
            });
            chart
                .draw_series(bars)
                .map_err(plot_err)?
                .label(name.as_str())
                .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], c.filled()));
        }
        if series.len() > 1 {
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperRight)
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()
                .map_err(plot_err)?;
        }
        root.present().map_err(plot_err)?;
    }
    Ok(svg)
}

/// The colour of a value in [0, 1] on a white-to-blue scale.
fn shade(v: f64) -> RGBColor {
    let v = v.clamp(0.0, 1.0);
    let mix = |from: f64, to: f64| (from + (to - from) * v).round() as u8;
    RGBColor(mix(255.0, 8.0), mix(255.0, 48.0), mix(255.0, 107.0))
}

/// A heat map: `rows` down, `cols` across, each cell's value in [0, 1] (a shade), printed in
/// the cell where the columns leave room (at most [`PRINTED_COLUMNS`]).
fn heat_map(
    title: &str,
    x_desc: &str,
    rows: &[String],
    cols: &[String],
    values: &[Vec<f64>],
) -> Result<String, String> {
    let printed = cols.len() <= PRINTED_COLUMNS;
    if rows.is_empty() || cols.is_empty() {
        return Ok(String::new());
    }
    let (nx, ny) = (cols.len() as i32, rows.len() as i32);
    let mut svg = String::new();
    {
        let height = (120 + 32 * rows.len() as u32).max(240);
        let root = SVGBackend::with_string(&mut svg, (WIDTH, height)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 16))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(150)
            .build_cartesian_2d((0..nx).into_segmented(), (0..ny).into_segmented())
            .map_err(plot_err)?;
        let name = |names: &[String], v: &SegmentValue<i32>| match v {
            SegmentValue::CenterOf(i) => names.get(*i as usize).cloned().unwrap_or_default(),
            _ => String::new(),
        };
        // Row 0 at the top.
        let down: Vec<String> = rows.iter().rev().cloned().collect();
        chart
            .configure_mesh()
            .disable_mesh()
            .x_labels(cols.len())
            .y_labels(rows.len())
            .x_label_formatter(&|v| name(cols, v))
            .y_label_formatter(&|v| name(&down, v))
            .x_desc(x_desc)
            .draw()
            .map_err(plot_err)?;
        for (r, row) in values.iter().enumerate() {
            let y = ny - 1 - r as i32;
            for (c, &v) in row.iter().enumerate() {
                let x = c as i32;
                let cell = [
                    (SegmentValue::Exact(x), SegmentValue::Exact(y)),
                    (SegmentValue::Exact(x + 1), SegmentValue::Exact(y + 1)),
                ];
                chart.draw_series(std::iter::once(Rectangle::new(cell, shade(v).filled()))).map_err(plot_err)?;
                if !printed {
                    continue;
                }
                let ink = if v > 0.5 { WHITE } else { BLACK };
                let text = Text::new(
                    format!("{v:.2}"),
                    (SegmentValue::CenterOf(x), SegmentValue::CenterOf(y)),
                    ("sans-serif", 11).into_font().color(&ink),
                );
                chart.draw_series(std::iter::once(text)).map_err(plot_err)?;
            }
        }
        root.present().map_err(plot_err)?;
    }
    Ok(svg)
}

/// A list of strings of `analysis.json` (`?` for what is not one).
fn strings(v: &Value) -> Vec<String> {
    v.as_array().into_iter().flatten().map(|c| c.as_str().unwrap_or("?").to_string()).collect()
}

/// A grid of numbers of `analysis.json` (0 for what is not one).
fn grid(v: &Value) -> Vec<Vec<f64>> {
    v.as_array()
        .into_iter()
        .flatten()
        .map(|r| r.as_array().into_iter().flatten().map(|v| v.as_f64().unwrap_or(0.0)).collect())
        .collect()
}

/// The mutual-information heat maps of an analysis (`--mi`), one per target category, each
/// followed by the learned map of the same target (`--attention`), and the retrieval NDCG.
fn mi_plots(a: &Value, page: &mut String) -> Result<(), String> {
    let m = &a["mutual_information"];
    let Some(maps) = m["maps"].as_array() else { return Ok(()) };
    let positions = m["positions"].as_u64().unwrap_or(0);
    let cols: Vec<String> = (1..=positions).map(|p| p.to_string()).collect();
    let x_desc = format!("position in {} (1 = most recent)", m["sequence"].as_str().unwrap_or("?"));
    let att = &a["attention"];
    for (i, map) in maps.iter().enumerate() {
        let title = format!(
            "MI with {}, target {} = {} ({} samples; min-max normalised)",
            m["task"].as_str().unwrap_or("?"),
            m["target"].as_str().unwrap_or("?"),
            map["target"].as_str().unwrap_or("?"),
            map["samples"]
        );
        page.push_str(&heat_map(&title, &x_desc, &strings(&map["categories"]), &cols, &grid(&map["normalized"]))?);
        let learned = &att["maps"][i];
        if learned.is_object() {
            let rho = learned["rank_correlation"].as_f64().map_or("–".to_string(), |r| format!("{r:.2}"));
            let title = format!(
                "Learned: mean {}, target {} ({} test samples; rank correlation with MI {rho})",
                att["probe"].as_str().unwrap_or("?"),
                learned["target"].as_str().unwrap_or("?"),
                learned["samples"]
            );
            let rows = strings(&learned["categories"]);
            page.push_str(&heat_map(&title, &x_desc, &rows, &cols, &grid(&learned["normalized"]))?);
        }
    }
    let r = &att["retrieval"];
    if let Some(ks) = r["ks"].as_array() {
        let groups: Vec<String> = ks.iter().map(|k| format!("@{k}")).collect();
        let series: Vec<(String, Vec<Option<f64>>)> = ["model", "recency"]
            .iter()
            .map(|order| (order.to_string(), (0..ks.len()).map(|i| r[order][i].as_f64()).collect()))
            .collect();
        let title = format!(
            "Retrieval NDCG: behaviours ranked by {} vs by recency, relevance = MI ({} samples)",
            att["probe"].as_str().unwrap_or("?"),
            r["samples"]
        );
        page.push_str(&bar_plot(&title, "k", "NDCG@k", &groups, &series)?);
    }
    Ok(())
}

/// The most columns of a heat map whose cells print their values.
const PRINTED_COLUMNS: usize = 16;

/// The sub-embedding IA matrix (`--interaction`) as a heat map of IA / K, fields sorted by
/// their own IA (largest first) down and, for the output blocks that are fields of the
/// table, across (the card's order).
fn interaction_plot(a: &Value, page: &mut String) -> Result<(), String> {
    let m = &a["interaction"];
    let Some(ia) = m["ia"].as_array() else { return Ok(()) };
    let k = m["dim"].as_f64().unwrap_or(1.0).max(1.0);
    let fields = strings(&m["fields"]);
    let outputs = strings(&m["outputs"]);
    let own: Vec<f64> = (0..fields.len()).map(|i| m["field_ia"][i].as_f64().unwrap_or(0.0)).collect();
    let mut order: Vec<usize> = (0..fields.len()).collect();
    order.sort_by(|&x, &y| own[y].total_cmp(&own[x]));
    let cols: Vec<usize> = order.iter().copied().chain(fields.len()..outputs.len()).collect();
    let values: Vec<Vec<f64>> =
        order.iter().map(|&i| cols.iter().map(|&j| ia[i][j].as_f64().unwrap_or(0.0) / k).collect()).collect();
    let rows: Vec<String> = order.iter().map(|&i| format!("{} ({:.1})", fields[i], own[i])).collect();
    let names: Vec<String> = cols.iter().map(|&j| outputs[j].clone()).collect();
    let title = format!(
        "Sub-embedding IA / K of {} through {} (rows: IA(E_i) in brackets)",
        m["table"].as_str().unwrap_or("?"),
        m["param"].as_str().unwrap_or("?")
    );
    page.push_str(&heat_map(&title, "output field j", &rows, &names, &values)?);
    // ‖W_{i→j}‖_F of the table's fields' blocks, in the same order (files written before it
    // have none).
    if let Some(norms) = m["block_norms"].as_array() {
        let values: Vec<Vec<f64>> =
            order.iter().map(|&i| cols.iter().map(|&j| norms[i][j].as_f64().unwrap_or(0.0)).collect()).collect();
        let title = format!(
            "‖W_i→j‖_F of {}'s blocks, input field i down, output field j across",
            m["param"].as_str().unwrap_or("?")
        );
        page.push_str(&heat_map(&title, "output field j", &rows, &names, &values)?);
    }
    Ok(())
}

/// The entanglement test (`--against`): the contradictory pairs' mean percentile under each
/// table of each run.
fn entanglement_plot(a: &Value, page: &mut String) -> Result<(), String> {
    let e = &a["entanglement"];
    let Some(tables) = e["tables"].as_array() else { return Ok(()) };
    let groups: Vec<String> = tables
        .iter()
        .map(|t| format!("{} {}", t["run"].as_str().unwrap_or("?"), t["table"].as_str().unwrap_or("?")))
        .collect();
    let series = vec![(
        "mean percentile".to_string(),
        tables.iter().map(|t| t["mean_percentile"].as_f64()).collect::<Vec<Option<f64>>>(),
    )];
    let title = format!(
        "Entanglement: {} pairs far under A, near under B; their mean distance percentile per table",
        e["selected"]
    );
    page.push_str(&bar_plot(&title, "run and table", "mean percentile", &groups, &series)?);
    Ok(())
}

/// The discriminability of a probed representation (`--clusters`): MI and NMI per k.
fn cluster_plot(a: &Value, page: &mut String) -> Result<(), String> {
    let c = &a["clusters"];
    let Some(list) = c["clusterings"].as_array() else { return Ok(()) };
    let series: Vec<(String, Vec<(f64, f64)>)> = [("MI (nats)", "mi"), ("NMI", "nmi")]
        .iter()
        .map(|(label, key)| {
            let points =
                list.iter().filter_map(|q| Some((q["k"].as_f64()?, q[*key].as_f64()?))).collect::<Vec<(f64, f64)>>();
            (label.to_string(), points)
        })
        .collect();
    let title = format!(
        "k-means clusters of {} vs {} ({} test rows; H(Y) = {:.3} nats)",
        c["probe"].as_str().unwrap_or("?"),
        c["task"].as_str().unwrap_or("?"),
        c["rows"],
        c["label_entropy"].as_f64().unwrap_or(0.0)
    );
    page.push_str(&line_plot(&title, "clusters k", "MI, NMI", &series)?);
    Ok(())
}

/// The plots of the runs' analyses: each table's spectrum (learned and initialised), each
/// gate's mean weights.
fn analysis_plots(runs: &[RunSeries], page: &mut String) -> Result<(), String> {
    for r in runs {
        let Some(a) = &r.analysis else { continue };
        let _ = writeln!(page, "<h3>{}</h3>", escape(&r.summary.model));
        let mut spectra = Vec::new();
        for t in a["embeddings"].as_array().into_iter().flatten() {
            let name = t["table"].as_str().unwrap_or("?");
            for (which, key) in [("learned", "learned"), ("init", "init")] {
                let points: Vec<(f64, f64)> = t[key]["normalized"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .enumerate()
                    .filter_map(|(k, v)| v.as_f64().map(|v| ((k + 1) as f64, v)))
                    .collect();
                let ia = t[key]["ia"].as_f64().map_or("–".to_string(), |x| format!("{x:.2}"));
                spectra.push((format!("{name} {which} (IA {ia})"), points));
            }
        }
        if !spectra.is_empty() {
            page.push_str(&line_plot("Singular spectrum of the embedding tables", "k", "σk / σ1", &spectra)?);
        }
        for p in a["probes"].as_array().into_iter().flatten().filter(|p| p["gate"].as_bool() == Some(true)) {
            let name = p["name"].as_str().unwrap_or("?");
            let k = p["overall"]["mean"].as_array().map_or(0, |m| m.len());
            let groups: Vec<String> = (0..k).map(|i| i.to_string()).collect();
            let mean = |s: &Value| -> Vec<Option<f64>> { (0..k).map(|i| s["mean"][i].as_f64()).collect() };
            let mut series = vec![("all".to_string(), mean(&p["overall"]))];
            // The largest domains (by rows of the split), as the Markdown report lists them.
            let mut domains: Vec<(&String, &Value)> = p["per_domain"].as_object().into_iter().flatten().collect();
            domains.sort_by_key(|(d, s)| (std::cmp::Reverse(s["rows"].as_u64().unwrap_or(0)), d.to_string()));
            for (d, s) in domains.into_iter().take(super::TOP_DOMAINS) {
                series.push((format!("domain {d}"), mean(s)));
            }
            let title = format!("Mean gate weight: {name}");
            page.push_str(&bar_plot(&title, "expert", "mean weight", &groups, &series)?);
        }
        mi_plots(a, page)?;
        cluster_plot(a, page)?;
        entanglement_plot(a, page)?;
        interaction_plot(a, page)?;
    }
    Ok(())
}

fn metric(v: Option<f64>) -> String {
    v.map_or("–".to_string(), |x| format!("{x:.4}"))
}

/// The page for the runs in `folders`, in that order.
pub fn page(folders: &[PathBuf]) -> Result<String, String> {
    let runs: Vec<RunSeries> = folders.iter().map(|f| read_run(f)).collect::<Result<_, _>>()?;
    let mut tasks: Vec<String> = Vec::new();
    for r in &runs {
        for t in r.curves.keys().chain(r.domain_auc.keys()) {
            if !tasks.contains(t) {
                tasks.push(t.clone());
            }
        }
    }
    let names: Vec<String> = runs.iter().map(|r| r.summary.model.clone()).collect();
    let mut page = String::from(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>mdl report</title>\n<style>\n\
         body { font-family: sans-serif; margin: 2em; color: #222; }\n\
         table { border-collapse: collapse; margin: 1em 0; }\n\
         th, td { border: 1px solid #bbb; padding: 0.3em 0.6em; text-align: right; }\n\
         th:first-child, td:first-child { text-align: left; }\n\
         svg { display: block; margin: 1em 0; }\n\
         </style>\n</head>\n<body>\n<h1>mdl report</h1>\n",
    );
    let _ = writeln!(page, "<p>Runs: {}. Tasks: {}.</p>", escape(&names.join(", ")), escape(&tasks.join(", ")));
    page.push_str("<h2>Metrics (test split)</h2>\n<table>\n<tr><th>run</th><th>params</th><th>AUC</th><th>gAUC</th><th>LogLoss</th><th>per-task AUC</th><th>train rows/s</th><th>epochs (best step)</th></tr>\n");
    for r in &runs {
        let s = &r.summary;
        let per_task: Vec<String> = s.tasks.iter().map(|(t, a)| format!("{t} {}", metric(*a))).collect();
        let _ = writeln!(
            page,
            "<tr><td>{}<br><small>{}</small></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(&s.model),
            escape(&s.folder.display().to_string()),
            s.parameters.map_or("–".to_string(), super::thousands),
            metric(s.auc),
            metric(s.gauc),
            metric(s.logloss),
            escape(&if per_task.is_empty() { "–".to_string() } else { per_task.join(", ") }),
            s.rows_per_s.map_or("–".to_string(), |x| super::thousands(x.round() as u64)),
            match (s.epochs, s.best_step, s.steps) {
                (Some(e), Some(b), Some(n)) => format!("{e} ({b} of {n})"),
                _ => "–".to_string(),
            }
        );
    }
    page.push_str("</table>\n<h2>Learning curves</h2>\n");
    for task in &tasks {
        let series: Vec<(String, Vec<(f64, f64)>)> =
            runs.iter().filter_map(|r| r.curves.get(task).map(|c| (r.summary.model.clone(), c.clone()))).collect();
        if !series.is_empty() {
            page.push_str(&line_plot(&format!("Valid AUC: {task}"), "step", "valid AUC", &series)?);
        }
    }
    let losses: Vec<(String, Vec<(f64, f64)>)> =
        runs.iter().filter(|r| !r.loss.is_empty()).map(|r| (r.summary.model.clone(), r.loss.clone())).collect();
    if !losses.is_empty() {
        page.push_str("<h2>Training loss</h2>\n");
        page.push_str(&line_plot("Training loss per step", "step", "loss", &losses)?);
    }
    if runs.iter().any(|r| !r.domain_auc.is_empty()) {
        page.push_str("<h2>Test AUC per domain</h2>\n");
        for task in &tasks {
            let mut domains: Vec<String> =
                runs.iter().filter_map(|r| r.domain_auc.get(task)).flat_map(|d| d.keys().cloned()).collect();
            domains.sort_by_key(|d| (d.parse::<u64>().unwrap_or(u64::MAX), d.clone()));
            domains.dedup();
            let series: Vec<(String, Vec<Option<f64>>)> = runs
                .iter()
                .filter_map(|r| {
                    r.domain_auc
                        .get(task)
                        .map(|d| (r.summary.model.clone(), domains.iter().map(|id| d.get(id).copied()).collect()))
                })
                .collect();
            if !series.is_empty() {
                page.push_str(&bar_plot(
                    &format!("Test AUC per domain: {task}"),
                    "domain",
                    "test AUC",
                    &domains,
                    &series,
                )?);
            }
        }
    }
    if runs.iter().any(|r| !r.grad_norms.is_empty() || r.grad_cosine.is_some()) {
        page.push_str("<h2>Gradients</h2>\n");
        gradient_plots(&runs, &mut page)?;
    }
    if runs.iter().any(|r| r.analysis.is_some()) {
        page.push_str("<h2>Analysis (mdl analyze)</h2>\n");
        analysis_plots(&runs, &mut page)?;
    }
    page.push_str("</body>\n</html>\n");
    Ok(page)
}
