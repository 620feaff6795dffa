//! The report of a comparison, rendered from its [`CompareResults`]: `report.md` (method x {PEFT,
//! PEFT+TPP, delta} and every variant with mean +- std over seeds, 95% bootstrap intervals, cost),
//! `results.json`, and PNG plots.
use crate::data::Task;
use crate::eval::{metrics, plots};
use crate::experiment::compare::{CellResult, CompareConfig, CompareResults};
use crate::pretext::Pretext;
use anyhow::Result;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let m = v.iter().sum::<f64>() / n.max(1.0);
    // Sample standard deviation (n - 1), 0 for a single seed.
    let s = if v.len() > 1 { (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1.0)).sqrt() } else { 0.0 };
    (m, s)
}

fn fmt_bytes(b: Option<f64>) -> String {
    match b {
        Some(b) => format!("{:.2} GiB", b / (1u64 << 30) as f64),
        None => "n/a (CPU)".into(),
    }
}

fn fmt_ci(ci: Option<metrics::Interval>, signed: bool) -> String {
    match (ci, signed) {
        (None, _) => "n/a".into(),
        (Some(c), false) => format!("{:.3} – {:.3}", c.low, c.high),
        (Some(c), true) => format!("{:+.3} – {:+.3}", c.low, c.high),
    }
}

/// Statistics over test images, shared by every variant: each bootstrap resample scores every seed's
/// predictions on the same images (joint resampling), so Δ intervals are paired.
struct Stats<'a> {
    r: &'a CompareResults,
    n_test: usize,
}

impl Stats<'_> {
    /// The metric averaged over a variant's seeds, on the test images `idx`.
    fn seed_mean(&self, cells: &[CellResult], idx: &[usize]) -> f64 {
        let metric = self.r.metric.name();
        let metric = metric.as_str();
        let vals: Vec<f64> = cells
            .iter()
            .filter_map(|c| {
                if self.r.task == Task::Segmentation {
                    // Segmentation runs store per-image Dice as their "predictions": the metric is their mean.
                    let v: f64 = idx.iter().map(|&i| c.probs[i][0]).sum();
                    return Some(v / idx.len().max(1) as f64);
                }
                let t: Vec<Vec<f64>> = idx.iter().map(|&i| c.truth[i].clone()).collect();
                let p: Vec<Vec<f64>> = idx.iter().map(|&i| c.probs[i].clone()).collect();
                metrics::classification(self.r.task, &t, &p).get(metric).copied()
            })
            .collect();
        vals.iter().sum::<f64>() / vals.len().max(1) as f64
    }

    /// 95% percentile-bootstrap interval (1000 resamples) of a statistic of the test images.
    fn ci(&self, f: &dyn Fn(&[usize]) -> f64) -> Option<metrics::Interval> {
        let b = metrics::bootstrap(self.n_test, 1000, 7, |idx| BTreeMap::from([("x".to_string(), f(idx))]));
        b.get("x").copied()
    }
}

/// One variant's summary: the table row, the JSON entry, and (mean, std, interval).
fn variant_summary(stats: &Stats, v: &str, second: &str) -> (String, Value, (f64, f64)) {
    let rs = &stats.r.cells[v];
    let metric = stats.r.metric.name();
    let metric = metric.as_str();
    let vals: Vec<f64> = rs.iter().filter_map(|c| c.metrics.get(metric).copied()).collect();
    let seconds: Vec<f64> = rs.iter().filter_map(|c| c.metrics.get(second).copied()).collect();
    let (m, s) = mean_std(&vals);
    let (am, asd) = mean_std(&seconds);
    let ci = stats.ci(&|idx| stats.seed_mean(rs, idx));
    let trainable = rs[0].run["trainable_params"].as_i64().unwrap_or(0);
    let total = rs[0].run["total_params"].as_i64().unwrap_or(0);
    let mean_of = |k: &str| mean_std(&rs.iter().filter_map(|c| c.run[k].as_f64()).collect::<Vec<_>>()).0;
    let (secs, ips) = (mean_of("seconds"), mean_of("images_per_s"));
    let peak = rs.iter().filter_map(|c| c.run["peak_memory_bytes"].as_f64()).reduce(f64::max);
    let row = format!(
        "| {v} | {trainable} ({:.2}%) | {m:.3} ± {s:.3} | {} | {am:.3} ± {asd:.3} | {secs:.0} s | {ips:.0} | {} |",
        100.0 * trainable as f64 / total.max(1) as f64,
        fmt_ci(ci, false),
        fmt_bytes(peak)
    );
    let per_seed: Vec<Value> = rs.iter().map(|c| json!({"seed": c.seed, "metrics": c.metrics, "run": c.run})).collect();
    let entry = json!({
        "per_seed": per_seed, "mean": m, "std": s, "ci95_of_mean": ci, "accuracy_mean": am, "accuracy_std": asd,
        "trainable_params": trainable, "total_params": total, "seconds_per_run": secs, "images_per_s": ips,
        "peak_memory_bytes": peak,
    });
    (row, entry, (m, s))
}

/// The PEFT vs PEFT + TPP table, with paired intervals of Δ; fills `results["delta"]`.
fn delta_table(
    cfg: &CompareConfig,
    stats: &Stats,
    summary: &BTreeMap<String, (f64, f64)>,
    results: &mut Value,
) -> String {
    let mut t = String::from("| method | PEFT | PEFT+TPP | Δ (TPP − PEFT) | 95% CI of Δ |\n|---|---|---|---|---|\n");
    for m in cfg.methods.iter().map(ToString::to_string) {
        let tpp = format!("{m}+tpp");
        let (Some(a), Some(b)) = (stats.r.cells.get(&m), stats.r.cells.get(&tpp)) else { continue };
        let ((pm, ps), (tm, ts)) = (summary[&m], summary[&tpp]);
        let dci = stats.ci(&|idx| stats.seed_mean(b, idx) - stats.seed_mean(a, idx));
        let _ =
            writeln!(t, "| {m} | {pm:.3} ± {ps:.3} | {tm:.3} ± {ts:.3} | {:+.3} | {} |", tm - pm, fmt_ci(dci, true));
        results["delta"][&m] = json!({"delta": tm - pm, "ci95": dci});
    }
    t
}

/// The TPP sweep's table per method: each setting's validation value and its delta to the plain run
/// (mean ± std over seeds), and for which seeds it was picked; fills `results["picks"]`.
fn picks_table(r: &CompareResults, results: &mut Value) -> String {
    let select = r.select.name();
    let mut md = String::new();
    let mut methods: Vec<&str> = Vec::new();
    for p in &r.picks {
        if !methods.contains(&p.method.as_str()) {
            methods.push(&p.method);
        }
    }
    for m in methods {
        let picks: Vec<&crate::experiment::compare::PickResult> = r.picks.iter().filter(|p| p.method == m).collect();
        let _ = writeln!(
            md,
            "{m}:\n\n| TPP setting | val {select}, {m}+tpp | Δ val vs {m} | picked for seeds |\n|---|---|---|---|"
        );
        let labels: Vec<String> = picks[0].record.validation.iter().map(|(l, _)| l.clone()).collect();
        for l in &labels {
            let val_of = |p: &crate::experiment::compare::PickResult| {
                p.record.validation.iter().find(|(x, _)| x == l).and_then(|(_, v)| *v)
            };
            let vals: Vec<f64> = picks.iter().filter_map(|p| val_of(p)).collect();
            let deltas: Vec<f64> = picks.iter().filter_map(|p| Some(val_of(p)? - p.plain_val?)).collect();
            let seeds: Vec<String> =
                picks.iter().filter(|p| &p.record.picked == l).map(|p| p.seed.to_string()).collect();
            let shown = |v: &[f64], sign: bool| {
                let (m, s) = mean_std(v);
                match (v.is_empty(), sign) {
                    (true, _) => "n/a".to_string(),
                    (false, true) => format!("{m:+.3} ± {s:.3}"),
                    (false, false) => format!("{m:.3} ± {s:.3}"),
                }
            };
            let seeds = if seeds.is_empty() { "-".to_string() } else { seeds.join(", ") };
            let _ = writeln!(md, "| {l} | {} | {} | {seeds} |", shown(&vals, false), shown(&deltas, true));
        }
        let plain: Vec<f64> = picks.iter().filter_map(|p| p.plain_val).collect();
        let (pm, ps) = mean_std(&plain);
        let _ = writeln!(md, "| (plain {m}) | {pm:.3} ± {ps:.3} | | |\n");
        results["picks"][m] = json!(
            picks
                .iter()
                .map(|p| json!({"seed": p.seed, "picked": p.record.picked,
            "validation": p.record.validation, "plain_val": p.plain_val}))
                .collect::<Vec<_>>()
        );
    }
    md
}

/// The pretext's name and its own settings: a DINO run has no decoder or mask ratio to report.
fn pretext_line(cfg: &CompareConfig) -> (&'static str, String) {
    let (t, d) = (&cfg.tpp, &cfg.dino);
    let settings = match cfg.pretext {
        Pretext::Mae => format!(
            "MAE, mask {}, decoder {} {}x{}",
            t.shown("mask_ratio", t.config.mae.mask_ratio),
            t.decoder,
            t.shown("decoder_depth", t.config.mae.decoder_depth),
            t.shown("decoder_dim", t.config.mae.decoder_dim)
        ),
        Pretext::Dino => format!(
            "DINO, {} prototypes, {} local crops, teacher temperature {}, EMA momentum {}",
            d.out_dim, d.local_crops, d.teacher_temp, d.momentum
        ),
    };
    (cfg.pretext.title(), settings)
}

/// The TPP stage's epochs, batch and lr, each as a list where swept.
fn tpp_line(cfg: &CompareConfig) -> String {
    let (t, s) = (&cfg.tpp.config, &cfg.tpp);
    let mut line = format!(
        "{} epochs, batch {}, lr {}",
        s.shown("epochs", t.epochs),
        s.shown("batch_size", t.batch_size),
        s.shown("lr", t.lr)
    );
    let shown_elsewhere = ["epochs", "batch_size", "lr", "mask_ratio", "decoder_dim", "decoder_depth"];
    let others: Vec<String> = s
        .sweep
        .iter()
        .filter(|a| !shown_elsewhere.contains(&a.key.as_str()))
        .map(|a| format!("{} {}", a.key, a.list()))
        .collect();
    if !others.is_empty() {
        line = format!("{line}, {}", others.join(", "));
    }
    line
}

/// Writes `report.md`, `results.json` and the plots of `r` into `out`; returns the markdown.
pub fn write(cfg: &CompareConfig, r: &CompareResults, out: &Path) -> Result<String> {
    let n_test = r.cells.values().next().and_then(|v| v.first()).map_or(0, |c| c.probs.len());
    let stats = Stats { r, n_test };
    let (metric, select) = (r.metric.name(), r.select.name());
    let (metric, select) = (metric.as_str(), select.as_str());
    // The second column: accuracy for classification, IoU for segmentation.
    let second = if r.task == Task::Segmentation { "iou" } else { "accuracy" };
    let mut results = json!({"metric": metric, "select": select, "seeds": cfg.seeds, "data": cfg.data.data,
        "backbone": cfg.backbone.path, "variants": {}});
    let mut summary = BTreeMap::new();
    let mut rows = String::new();
    for v in &r.variants {
        let (row, entry, ms) = variant_summary(&stats, v, second);
        let _ = writeln!(rows, "{row}");
        results["variants"][v] = entry;
        summary.insert(v.clone(), ms);
    }
    let head = delta_table(cfg, &stats, &summary, &mut results);
    let (pretext_name, pretext) = pretext_line(cfg);
    let f = &cfg.finetune;
    // A comparison of references only (`methods = []`) has no TPP stage to describe.
    let has_tpp = !cfg.methods.is_empty();
    let pretext_name = if has_tpp { format!("; pretext {pretext_name}") } else { String::new() };
    let mut md = String::new();
    let _ = writeln!(md, "# tpp compare: {}\n", cfg.data.data.display());
    let _ = writeln!(
        md,
        "Backbone `{}`{pretext_name}; seeds {:?}; test metric `{metric}` (model selection on validation `{select}`; the test split is scored once per run, at the best validation epoch).\n",
        match &cfg.backbone.hub {
            Some(h) => format!("hf-hub:{}@{}", h.repo, h.commit),
            None => cfg.backbone.path.display().to_string(),
        },
        cfg.seeds
    );
    if has_tpp {
        let _ = writeln!(md, "## PEFT vs PEFT + TPP (test {metric}, mean ± sample std over seeds)\n\n{head}");
    }
    if !r.picks.is_empty() {
        let table = picks_table(r, &mut results);
        let _ = writeln!(
            md,
            "## TPP settings picked on validation\n\nThe TPP stage ran with every setting of `[tpp]`'s lists ({}); each seed's PEFT+TPP run is the one whose fine-tuned model scored best on validation `{select}` (the first listed on a tie), and only that run was scored on the test split: the PEFT+TPP test numbers above are the picks'. Validation values are the best epoch's (mean ± sample std over seeds). Cost: `time / run` below is the pick's fine-tuning; every seed also ran a TPP stage and a fine-tuning for each of the {} settings.\n\n{table}",
            cfg.tpp.sweep_line(),
            cfg.tpp.sweep.iter().map(|a| a.values.len()).product::<usize>()
        );
    }
    let _ = writeln!(md, "## All variants\n");
    let _ = writeln!(
        md,
        "| variant | trainable params | test {metric} | 95% CI (seed mean) | test {second} | time / run | img/s (train) | peak GPU memory |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|");
    md.push_str(&rows);
    let _ = writeln!(
        md,
        "\nIntervals: percentile bootstrap over test images (1000 resamples), each resample scoring every seed's predictions; Δ intervals are paired (same resamples). Fine-tuning: {} epochs, batch {}, lr {} (full: {}){}. Every setting: `compare.toml`.",
        f.config.epochs,
        f.config.batch_size,
        f.config.lr,
        f.full_lr,
        if has_tpp { format!("; TPP: {}, {pretext}", tpp_line(cfg)) } else { String::new() },
    );
    if r.task == Task::Segmentation {
        let g = &f.config.seg;
        let how = if g.native {
            let size = if g.data_size > 0 { format!("{0} x {0}", g.data_size) } else { "their own size".into() };
            format!(
                "images at {size}, {} random crops per image and epoch, sliding windows (overlap {}) over whole images",
                g.crops_per_image, g.overlap
            )
        } else {
            "images resized to the model's input".to_string()
        };
        let _ = writeln!(md, "\nSegmentation: head `{}`, loss `{}`, {how}.", g.head, g.loss);
    }
    if cfg.references.contains(&crate::experiment::compare::Reference::Linear) {
        let how = match cfg.linear_probe {
            crate::experiment::compare::LinearProbe::Features => {
                "on pooled features computed once per image (eval mode, no augmentation), as benchmark papers probe"
            }
            crate::experiment::compare::LinearProbe::Augmented => {
                "through the frozen backbone every epoch, with the fine-tuning augmentation"
            }
        };
        let _ = writeln!(md, "\nLinear probe (`linear`): the head trained {how}.");
    }
    crate::peft::io::write_text_atomic(&out.join("results.json"), &serde_json::to_string_pretty(&results)?)?;
    crate::peft::io::write_text_atomic(&out.join("report.md"), &md)?;
    write_plots(cfg, r, &summary, out)?;
    Ok(md)
}

/// `<metric>.png` (bars with error bars) and `curves_<method>.png` (validation curves, PEFT vs PEFT + TPP).
fn write_plots(
    cfg: &CompareConfig,
    r: &CompareResults,
    summary: &BTreeMap<String, (f64, f64)>,
    out: &Path,
) -> Result<()> {
    let (metric, select) = (r.metric.name(), r.select.name());
    let (metric, select) = (metric.as_str(), select.as_str());
    let bars: Vec<(String, f64, f64)> = r.variants.iter().map(|v| (v.clone(), summary[v].0, summary[v].1)).collect();
    plots::bars(&out.join(format!("{metric}.png")), &format!("test {metric} (mean ± std over seeds)"), metric, &bars)?;
    for m in cfg.methods.iter().map(ToString::to_string) {
        let mut series = Vec::new();
        for v in [m.clone(), format!("{m}+tpp")] {
            let Some(rs) = r.cells.get(&v) else { continue };
            let len = rs.iter().map(|c| c.curve.len()).min().unwrap_or(0);
            let pts: Vec<(f64, f64)> = (0..len)
                .map(|i| (rs[0].curve[i].0, rs.iter().map(|c| c.curve[i].1).sum::<f64>() / rs.len() as f64))
                .collect();
            series.push((v, pts));
        }
        plots::lines(
            &out.join(format!("curves_{}.png", m.replace('+', "_"))),
            &format!("{m}: validation {select} (mean over seeds)"),
            "epoch",
            select,
            &series,
        )?;
    }
    Ok(())
}
