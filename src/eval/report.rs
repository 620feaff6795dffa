//! The report of `tpp compare`: `report.md` (method x {PEFT, PEFT+TPP, delta} and every variant with mean
//! +- std over seeds, 95% bootstrap intervals, cost), `results.json`, and PNG plots.
use crate::cli::compare::{Cell, CompareConfig};
use crate::cli::pretrain::Pretext;
use crate::eval::{metrics, plots};
use anyhow::{Context, Result, anyhow};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

struct CellResult {
    metrics: BTreeMap<String, f64>,
    probs: Vec<Vec<f64>>,
    truth: Vec<Vec<f64>>,
    run: Value,
    curve: Vec<(f64, f64)>,
}

fn read_cell(c: &Cell, select: &str) -> Result<CellResult> {
    let p = c.dir.join("metrics.json");
    let v: Value =
        serde_json::from_str(&std::fs::read_to_string(&p).with_context(|| format!("{}: cannot read", p.display()))?)
            .map_err(|e| anyhow!("{}: {e}", p.display()))?;
    let metrics = v
        .as_object()
        .map(|o| o.iter().filter_map(|(k, x)| x.as_f64().map(|f| (k.clone(), f))).collect())
        .unwrap_or_default();
    let grid = |key: &str| -> Vec<Vec<f64>> {
        v["predictions"][key]
            .as_array()
            .map(|rows| {
                rows.iter()
                    .map(|r| r.as_array().map(|a| a.iter().filter_map(Value::as_f64).collect()).unwrap_or_default())
                    .collect()
            })
            .unwrap_or_default()
    };
    let h: Value = std::fs::read_to_string(c.dir.join("history.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(Value::Null);
    let curve = h
        .as_array()
        .map(|a| a.iter().filter_map(|r| Some((r["epoch"].as_f64()?, r["val"][select].as_f64()?))).collect())
        .unwrap_or_default();
    Ok(CellResult { metrics, probs: grid("probs"), truth: grid("truth"), run: v["run"].clone(), curve })
}

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

pub fn build(cfg: &CompareConfig, cells: &[Cell], metric: &str, out: &Path) -> Result<String> {
    let task = cells.first().map(|c| c.record.task).ok_or_else(|| anyhow!("compare: no runs"))?;
    let select = cells[0].record.config.select.clone();
    let mut variants: Vec<String> = Vec::new();
    let mut by: BTreeMap<String, Vec<(u64, CellResult)>> = BTreeMap::new();
    for c in cells {
        if !variants.contains(&c.variant) {
            variants.push(c.variant.clone());
        }
        by.entry(c.variant.clone()).or_default().push((c.seed, read_cell(c, &select)?));
    }
    // Joint bootstrap over test images: each resample scores every seed's predictions on the same images.
    let n_test = by.values().next().and_then(|v| v.first()).map_or(0, |(_, r)| r.probs.len());
    let seed_mean = |rs: &[(u64, CellResult)], idx: &[usize]| -> f64 {
        let vals: Vec<f64> = rs
            .iter()
            .filter_map(|(_, r)| {
                if task == crate::data::Task::Segmentation {
                    // Segmentation runs store per-image Dice as their "predictions": the metric is their mean.
                    let v: f64 = idx.iter().map(|&i| r.probs[i][0]).sum();
                    return Some(v / idx.len().max(1) as f64);
                }
                let t: Vec<Vec<f64>> = idx.iter().map(|&i| r.truth[i].clone()).collect();
                let p: Vec<Vec<f64>> = idx.iter().map(|&i| r.probs[i].clone()).collect();
                metrics::classification(task, &t, &p).get(metric).copied()
            })
            .collect();
        vals.iter().sum::<f64>() / vals.len().max(1) as f64
    };
    let ci_of = |f: &dyn Fn(&[usize]) -> f64| -> Option<metrics::Interval> {
        let b = metrics::bootstrap(n_test, 1000, 7, |idx| BTreeMap::from([("x".to_string(), f(idx))]));
        b.get("x").copied()
    };
    // The second column: accuracy for classification, IoU for segmentation.
    let second = if task == crate::data::Task::Segmentation { "iou" } else { "accuracy" };
    let mut results = json!({"metric": metric, "select": select, "seeds": cfg.seeds, "data": cfg.data, "backbone": cfg.backbone, "variants": {}});
    let mut summary: BTreeMap<String, (f64, f64, Option<metrics::Interval>)> = BTreeMap::new();
    let mut rows = String::new();
    for v in &variants {
        let rs = &by[v];
        let vals: Vec<f64> = rs.iter().filter_map(|(_, r)| r.metrics.get(metric).copied()).collect();
        let accs: Vec<f64> = rs.iter().filter_map(|(_, r)| r.metrics.get(second).copied()).collect();
        let (m, s) = mean_std(&vals);
        let (am, asd) = mean_std(&accs);
        let ci = ci_of(&|idx| seed_mean(rs, idx));
        let trainable = rs[0].1.run["trainable_params"].as_i64().unwrap_or(0);
        let total = rs[0].1.run["total_params"].as_i64().unwrap_or(0);
        let secs = mean_std(&rs.iter().filter_map(|(_, r)| r.run["seconds"].as_f64()).collect::<Vec<_>>()).0;
        let ips = mean_std(&rs.iter().filter_map(|(_, r)| r.run["images_per_s"].as_f64()).collect::<Vec<_>>()).0;
        let peak = rs
            .iter()
            .filter_map(|(_, r)| r.run["peak_memory_bytes"].as_f64())
            .fold(None, |a: Option<f64>, b| Some(a.map_or(b, |a| a.max(b))));
        let _ = writeln!(
            rows,
            "| {v} | {trainable} ({:.2}%) | {m:.3} ± {s:.3} | {} | {am:.3} ± {asd:.3} | {secs:.0} s | {ips:.0} | {} |",
            100.0 * trainable as f64 / total.max(1) as f64,
            ci.map_or("n/a".into(), |c| format!("{:.3} – {:.3}", c.low, c.high)),
            fmt_bytes(peak)
        );
        summary.insert(v.clone(), (m, s, ci));
        results["variants"][v] = json!({
            "per_seed": rs.iter().map(|(seed, r)| json!({"seed": seed, "metrics": r.metrics, "run": r.run})).collect::<Vec<_>>(),
            "mean": m, "std": s, "ci95_of_mean": ci, "accuracy_mean": am, "accuracy_std": asd,
            "trainable_params": trainable, "total_params": total, "seconds_per_run": secs, "images_per_s": ips, "peak_memory_bytes": peak,
        });
    }
    let mut head = String::new();
    let _ = writeln!(head, "| method | PEFT | PEFT+TPP | Δ (TPP − PEFT) | 95% CI of Δ |");
    let _ = writeln!(head, "|---|---|---|---|---|");
    for m in &cfg.methods {
        let (Some(a), Some(b)) = (by.get(m), by.get(&format!("{m}+tpp"))) else { continue };
        let (pm, ps, _) = summary[m];
        let (tm, ts, _) = summary[&format!("{m}+tpp")];
        let dci = ci_of(&|idx| seed_mean(b, idx) - seed_mean(a, idx));
        let _ = writeln!(
            head,
            "| {m} | {pm:.3} ± {ps:.3} | {tm:.3} ± {ts:.3} | {:+.3} | {} |",
            tm - pm,
            dci.map_or("n/a".into(), |c| format!("{:+.3} – {:+.3}", c.low, c.high))
        );
        results["delta"][m] = json!({"delta": tm - pm, "ci95": dci});
    }
    let mut md = String::new();
    // The pretext's own settings: a DINO run has no decoder or mask ratio to report.
    let t = &cfg.tpp;
    let (pretext_name, pretext) = match cfg.pretext {
        Pretext::Mae => {
            ("MAE", format!("MAE, mask {}, decoder {} {}x{}", t.mask_ratio, t.decoder, t.decoder_depth, t.decoder_dim))
        }
        Pretext::Dino => (
            "DINO",
            format!(
                "DINO, {} prototypes, {} local crops, teacher temperature {}, EMA momentum {}",
                cfg.dino.out_dim, cfg.dino.local_crops, cfg.dino.teacher_temp, cfg.dino.momentum
            ),
        ),
    };
    let _ = writeln!(md, "# tpp compare: {}\n", cfg.data.display());
    let _ = writeln!(
        md,
        "Backbone `{}`; pretext {}; seeds {:?}; test metric `{metric}` (model selection on validation `{select}`; the test split is scored once per run, at the best validation epoch).\n",
        cfg.backbone.display(),
        pretext_name,
        cfg.seeds
    );
    let _ = writeln!(md, "## PEFT vs PEFT + TPP (test {metric}, mean ± sample std over seeds)\n\n{head}");
    let _ = writeln!(md, "## All variants\n");
    let _ = writeln!(
        md,
        "| variant | trainable params | test {metric} | 95% CI (seed mean) | test {second} | time / run | img/s (train) | peak GPU memory |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|");
    md.push_str(&rows);
    let _ = writeln!(
        md,
        "\nIntervals: percentile bootstrap over test images (1000 resamples), each resample scoring every seed's predictions; Δ intervals are paired (same resamples). Fine-tuning: {} epochs, batch {}, lr {} (full: {}); TPP: {} epochs, batch {}, lr {}, {pretext}. Every setting: `compare.toml`.",
        cfg.finetune.epochs,
        cfg.finetune.batch_size,
        cfg.finetune.lr,
        cfg.finetune.full_lr,
        t.epochs,
        t.batch_size,
        t.lr,
    );
    std::fs::write(out.join("report.md"), &md).with_context(|| format!("{}: cannot write report", out.display()))?;
    std::fs::write(out.join("results.json"), serde_json::to_string_pretty(&results)?)?;
    let bars: Vec<(String, f64, f64)> = variants.iter().map(|v| (v.clone(), summary[v].0, summary[v].1)).collect();
    plots::bars(&out.join(format!("{metric}.png")), &format!("test {metric} (mean ± std over seeds)"), metric, &bars)?;
    for m in &cfg.methods {
        let mut series = Vec::new();
        for v in [m.clone(), format!("{m}+tpp")] {
            let Some(rs) = by.get(&v) else { continue };
            let len = rs.iter().map(|(_, r)| r.curve.len()).min().unwrap_or(0);
            let pts: Vec<(f64, f64)> = (0..len)
                .map(|i| (rs[0].1.curve[i].0, rs.iter().map(|(_, r)| r.curve[i].1).sum::<f64>() / rs.len() as f64))
                .collect();
            series.push((v, pts));
        }
        plots::lines(
            &out.join(format!("curves_{}.png", m.replace('+', "_"))),
            &format!("{m}: validation {select} (mean over seeds)"),
            "epoch",
            &select,
            &series,
        )?;
    }
    Ok(md)
}
