//! Metrics for classification and segmentation, with sklearn's definitions (checked against sklearn
//! outputs in tests), and percentile-bootstrap confidence intervals.
use crate::data::Task;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// ROC AUC of scores for a binary truth (Mann-Whitney U with average ranks for ties). None when only one
/// class is present.
pub fn roc_auc(truth: &[bool], score: &[f64]) -> Option<f64> {
    let n = truth.len();
    let pos = truth.iter().filter(|&&t| t).count();
    let neg = n - pos;
    if pos == 0 || neg == 0 {
        return None;
    }
    let mut idx: Vec<usize> = (0..n).collect();
    idx.sort_by(|&a, &b| score[a].total_cmp(&score[b]));
    let mut ranks = vec![0f64; n];
    let mut i = 0;
    while i < n {
        let mut j = i;
        while j + 1 < n && score[idx[j + 1]] == score[idx[i]] {
            j += 1;
        }
        let r = (i + j) as f64 / 2.0 + 1.0;
        for k in i..=j {
            ranks[idx[k]] = r;
        }
        i = j + 1;
    }
    let sum_pos: f64 = (0..n).filter(|&k| truth[k]).map(|k| ranks[k]).sum();
    Some((sum_pos - (pos * (pos + 1)) as f64 / 2.0) / (pos * neg) as f64)
}

/// Confusion matrix [truth][prediction].
pub fn confusion(truth: &[i64], pred: &[i64], k: usize) -> Vec<Vec<i64>> {
    let mut m = vec![vec![0i64; k]; k];
    for (&t, &p) in truth.iter().zip(pred) {
        if (t as usize) < k && (p as usize) < k {
            m[t as usize][p as usize] += 1;
        }
    }
    m
}

/// Quadratic-weighted Cohen's kappa (sklearn `cohen_kappa_score(weights="quadratic")`).
pub fn quadratic_kappa(cm: &[Vec<i64>]) -> f64 {
    let k = cm.len();
    let n: f64 = cm.iter().flatten().sum::<i64>() as f64;
    let rows: Vec<f64> = cm.iter().map(|r| r.iter().sum::<i64>() as f64).collect();
    let cols: Vec<f64> = (0..k).map(|j| cm.iter().map(|r| r[j]).sum::<i64>() as f64).collect();
    let (mut num, mut den) = (0.0, 0.0);
    for i in 0..k {
        for j in 0..k {
            let w = ((i as f64 - j as f64) / ((k - 1).max(1) as f64)).powi(2);
            num += w * cm[i][j] as f64;
            den += w * rows[i] * cols[j] / n;
        }
    }
    if den == 0.0 { 0.0 } else { 1.0 - num / den }
}

/// A metric to select models by or to report, by its name in `metrics.json` (`auc`, `dice_class1`, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Metric {
    /// ROC AUC (one-vs-rest mean for several classes or labels).
    Auc,
    /// Accuracy.
    Accuracy,
    /// Mean per-class recall.
    BalancedAccuracy,
    /// Macro F1.
    F1,
    /// Recall of the positive class (binary tasks).
    Sensitivity,
    /// Recall of the negative class (binary tasks).
    Specificity,
    /// Quadratic-weighted Cohen's kappa (ordinal tasks).
    Kappa,
    /// Dice, per image, averaged over the foreground classes (segmentation).
    Dice,
    /// IoU, per image, averaged over the foreground classes (segmentation).
    Iou,
    /// Dice of one class (segmentation with several classes).
    DiceClass(u32),
    /// IoU of one class (segmentation with several classes).
    IouClass(u32),
}

/// The metrics named without a class, with their names.
const NAMED: &[(Metric, &str)] = &[
    (Metric::Auc, "auc"),
    (Metric::Accuracy, "accuracy"),
    (Metric::BalancedAccuracy, "balanced_accuracy"),
    (Metric::F1, "f1"),
    (Metric::Sensitivity, "sensitivity"),
    (Metric::Specificity, "specificity"),
    (Metric::Kappa, "kappa"),
    (Metric::Dice, "dice"),
    (Metric::Iou, "iou"),
];

impl Metric {
    /// The name under which metric maps hold it.
    pub fn name(self) -> String {
        match self {
            Metric::DiceClass(c) => format!("dice_class{c}"),
            Metric::IouClass(c) => format!("iou_class{c}"),
            m => NAMED.iter().find(|(n, _)| *n == m).map_or_else(String::new, |(_, s)| s.to_string()),
        }
    }

    /// Whether runs of `task` with `classes` classes (or labels) report this metric: an error naming the
    /// metrics they do report otherwise, so a bad `--select` fails before training, not after it.
    pub fn check_for(self, task: Task, classes: i64) -> Result<(), String> {
        if self.reported(task, classes) {
            return Ok(());
        }
        let valid: Vec<String> = NAMED
            .iter()
            .map(|(m, _)| *m)
            .chain((1..classes.min(64) as u32).flat_map(|c| [Metric::DiceClass(c), Metric::IouClass(c)]))
            .filter(|m| m.reported(task, classes))
            .map(|m| m.name())
            .collect();
        Err(format!(
            "metric '{self}' is not reported for this data ({task:?}, {classes} classes); use one of {}",
            valid.join(", ")
        ))
    }

    /// Whether runs of `task` with `classes` classes (or labels) report this metric.
    fn reported(self, task: Task, classes: i64) -> bool {
        match (task, self) {
            (Task::Segmentation, Metric::Dice | Metric::Iou) => true,
            (Task::Segmentation, Metric::DiceClass(c) | Metric::IouClass(c)) => {
                classes > 2 && c >= 1 && (c as i64) < classes
            }
            (Task::Segmentation, _) | (_, Metric::Dice | Metric::Iou | Metric::DiceClass(_) | Metric::IouClass(_)) => {
                false
            }
            (Task::Multilabel, m) => matches!(m, Metric::Auc | Metric::Accuracy | Metric::F1),
            (_, Metric::Sensitivity | Metric::Specificity) => classes == 2,
            (t, Metric::Kappa) => t == Task::Ordinal,
            _ => true,
        }
    }

    /// The default selection metric of a task: kappa (ordinal), Dice (segmentation), else AUC.
    pub fn default_for(task: Task) -> Metric {
        match task {
            Task::Ordinal => Metric::Kappa,
            Task::Segmentation => Metric::Dice,
            _ => Metric::Auc,
        }
    }
}

impl std::fmt::Display for Metric {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}

impl std::str::FromStr for Metric {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some((m, _)) = NAMED.iter().find(|(_, n)| *n == s) {
            return Ok(*m);
        }
        let class = |prefix: &str| s.strip_prefix(prefix).and_then(|c| c.parse::<u32>().ok());
        if let Some(c) = class("dice_class") {
            return Ok(Metric::DiceClass(c));
        }
        if let Some(c) = class("iou_class") {
            return Ok(Metric::IouClass(c));
        }
        let names: Vec<&str> = NAMED.iter().map(|(_, n)| *n).collect();
        Err(format!("unknown metric '{s}' (expected one of {}, dice_classK, iou_classK)", names.join(", ")))
    }
}

impl Serialize for Metric {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.name())
    }
}

impl<'de> Deserialize<'de> for Metric {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

/// Classification metrics from class probabilities [N][K] (single-label) or label probabilities
/// (multi-label), under their lower-case names.
pub fn classification(task: Task, truth: &[Vec<f64>], probs: &[Vec<f64>]) -> BTreeMap<String, f64> {
    if probs.is_empty() {
        return BTreeMap::new();
    }
    if task == Task::Multilabel { multilabel(truth, probs) } else { single_label(task, truth, probs) }
}

/// Mean of a list, None when empty.
fn mean(v: &[f64]) -> Option<f64> {
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

/// F1 from counts (0 when there is nothing to count).
fn f1(tp: f64, fp: f64, fn_: f64) -> f64 {
    if tp + fp + fn_ == 0.0 { 0.0 } else { 2.0 * tp / (2.0 * tp + fp + fn_) }
}

/// Multi-label: macro AUC over labels with both values, element accuracy at 0.5, macro F1.
fn multilabel(truth: &[Vec<f64>], probs: &[Vec<f64>]) -> BTreeMap<String, f64> {
    let (n, k) = (probs.len(), probs[0].len());
    let mut m = BTreeMap::new();
    let aucs: Vec<f64> = (0..k)
        .filter_map(|j| {
            roc_auc(
                &truth.iter().map(|t| t[j] > 0.5).collect::<Vec<_>>(),
                &probs.iter().map(|p| p[j]).collect::<Vec<_>>(),
            )
        })
        .collect();
    if let Some(a) = mean(&aucs) {
        m.insert("auc".into(), a);
    }
    let correct =
        truth.iter().zip(probs).map(|(t, p)| (0..k).filter(|&j| (p[j] > 0.5) == (t[j] > 0.5)).count()).sum::<usize>();
    m.insert("accuracy".into(), correct as f64 / (n * k) as f64);
    let f1s: Vec<f64> = (0..k)
        .map(|j| {
            let (mut tp, mut fp, mut fn_) = (0.0, 0.0, 0.0);
            for (t, p) in truth.iter().zip(probs) {
                match (t[j] > 0.5, p[j] > 0.5) {
                    (true, true) => tp += 1.0,
                    (false, true) => fp += 1.0,
                    (true, false) => fn_ += 1.0,
                    _ => {}
                }
            }
            f1(tp, fp, fn_)
        })
        .collect();
    m.insert("f1".into(), f1s.iter().sum::<f64>() / k as f64);
    m
}

/// Binary, multi-class and ordinal: accuracy, balanced accuracy, macro F1, AUC (one-vs-rest macro for
/// more than two classes), sensitivity and specificity (binary), quadratic kappa (ordinal).
fn single_label(task: Task, truth: &[Vec<f64>], probs: &[Vec<f64>]) -> BTreeMap<String, f64> {
    let (n, k) = (probs.len(), probs[0].len());
    let mut m = BTreeMap::new();
    let t: Vec<i64> = truth.iter().map(|v| v[0] as i64).collect();
    let pred: Vec<i64> =
        probs.iter().map(|p| (0..k).max_by(|&a, &b| p[a].total_cmp(&p[b])).unwrap_or(0) as i64).collect();
    let cm = confusion(&t, &pred, k);
    let correct: i64 = (0..k).map(|i| cm[i][i]).sum();
    m.insert("accuracy".into(), correct as f64 / n as f64);
    let recalls: Vec<f64> = (0..k)
        .filter(|&i| cm[i].iter().sum::<i64>() > 0)
        .map(|i| cm[i][i] as f64 / cm[i].iter().sum::<i64>() as f64)
        .collect();
    m.insert("balanced_accuracy".into(), recalls.iter().sum::<f64>() / recalls.len().max(1) as f64);
    let f1s: Vec<f64> = (0..k)
        .map(|i| {
            let tp = cm[i][i] as f64;
            let fp = (0..k).map(|r| cm[r][i]).sum::<i64>() as f64 - tp;
            f1(tp, fp, cm[i].iter().sum::<i64>() as f64 - tp)
        })
        .collect();
    m.insert("f1".into(), f1s.iter().sum::<f64>() / k as f64);
    let auc_of = |j: usize| {
        roc_auc(&t.iter().map(|&x| x == j as i64).collect::<Vec<_>>(), &probs.iter().map(|p| p[j]).collect::<Vec<_>>())
    };
    if k == 2 {
        if let Some(a) = auc_of(1) {
            m.insert("auc".into(), a);
        }
        let (tp, fn_, fp, tn) = (cm[1][1] as f64, cm[1][0] as f64, cm[0][1] as f64, cm[0][0] as f64);
        m.insert("sensitivity".into(), if tp + fn_ > 0.0 { tp / (tp + fn_) } else { 0.0 });
        m.insert("specificity".into(), if tn + fp > 0.0 { tn / (tn + fp) } else { 0.0 });
    } else if let Some(a) = mean(&(0..k).filter_map(auc_of).collect::<Vec<_>>()) {
        // Macro one-vs-rest AUC over classes present (sklearn multi_class="ovr", average="macro").
        m.insert("auc".into(), a);
    }
    if task == Task::Ordinal {
        m.insert("kappa".into(), quadratic_kappa(&cm));
    }
    m
}

/// Per-image segmentation counts for one class: (intersection, prediction area, truth area).
pub type SegCounts = Vec<[f64; 3]>;

/// Dice and IoU per class (foreground classes 1.. when `k` > 1) and their means, and the mean
/// sensitivity (foreground recall), from per-image counts [image][class] -> (intersection, pred, truth).
/// Averaged over images (an image with neither truth nor prediction counts as 1).
pub fn segmentation(counts: &[SegCounts]) -> BTreeMap<String, f64> {
    let mut m = BTreeMap::new();
    if counts.is_empty() {
        return m;
    }
    let k = counts[0].len();
    let first = if k > 1 { 1 } else { 0 };
    let (mut dice_sum, mut iou_sum, mut sens_sum) = (0.0, 0.0, 0.0);
    for c in first..k {
        let (mut d, mut j, mut se) = (0.0, 0.0, 0.0);
        for img in counts {
            let [i, p, t] = img[c];
            let u = p + t - i;
            d += if p + t == 0.0 { 1.0 } else { 2.0 * i / (p + t) };
            j += if u == 0.0 { 1.0 } else { i / u };
            // Sensitivity (recall) of the class at the argmax operating point (0.5 for two classes).
            se += if t == 0.0 { 1.0 } else { i / t };
        }
        let nimg = counts.len() as f64;
        let (d, j, se) = (d / nimg, j / nimg, se / nimg);
        if k > 2 {
            m.insert(format!("dice_class{c}"), d);
            m.insert(format!("iou_class{c}"), j);
        }
        dice_sum += d;
        iou_sum += j;
        sens_sum += se;
    }
    let nc = (k - first) as f64;
    m.insert("dice".into(), dice_sum / nc);
    m.insert("iou".into(), iou_sum / nc);
    m.insert("sensitivity".into(), sens_sum / nc);
    m
}

/// A confidence interval.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct Interval {
    /// Lower bound.
    pub low: f64,
    /// Upper bound.
    pub high: f64,
}

/// 95% percentile-bootstrap intervals of every metric: `compute` is re-run on `resamples` resamples (with
/// replacement) of the `n` items.
pub fn bootstrap(
    n: usize,
    resamples: usize,
    seed: u64,
    compute: impl Fn(&[usize]) -> BTreeMap<String, f64>,
) -> BTreeMap<String, Interval> {
    let _s = crate::profile::span("bootstrap intervals");
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut samples: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for _ in 0..resamples {
        let idx: Vec<usize> = (0..n).map(|_| rng.random_range(0..n)).collect();
        for (k, v) in compute(&idx) {
            if v.is_finite() {
                samples.entry(k).or_default().push(v);
            }
        }
    }
    samples
        .into_iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, mut v)| {
            v.sort_by(f64::total_cmp);
            let q = |p: f64| v[((p * (v.len() - 1) as f64).round() as usize).min(v.len() - 1)];
            (k, Interval { low: q(0.025), high: q(0.975) })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_names_round_trip_per_class_ones_too() {
        for name in ["auc", "balanced_accuracy", "kappa", "dice", "dice_class2", "iou_class1"] {
            assert_eq!(name.parse::<Metric>().unwrap().name(), name);
        }
        assert!("dice_classX".parse::<Metric>().unwrap_err().contains("unknown metric"));
        assert!(Metric::Auc.check_for(Task::Binary, 2).is_ok());
        assert!(Metric::Kappa.check_for(Task::Ordinal, 5).is_ok());
        assert!(Metric::Kappa.check_for(Task::Multiclass, 5).unwrap_err().contains("balanced_accuracy"));
        assert!(Metric::Sensitivity.check_for(Task::Multiclass, 3).is_err());
        assert!(Metric::Auc.check_for(Task::Segmentation, 2).unwrap_err().contains("dice"));
        assert!(Metric::DiceClass(2).check_for(Task::Segmentation, 3).is_ok());
        assert!(Metric::DiceClass(3).check_for(Task::Segmentation, 3).is_err());
        assert!(Metric::DiceClass(1).check_for(Task::Segmentation, 2).is_err());
        assert!(Metric::BalancedAccuracy.check_for(Task::Multilabel, 4).is_err());
    }

    #[test]
    fn auc_by_hand() {
        // 3 positives, 2 negatives; pairs (p > n): (0.9>0.3,0.9>0.5,0.6>0.3,0.6>0.5,0.5=0.5 -> 0.5,0.5>0.3) = 5.5 of 6
        let t = [true, false, true, true, false];
        let s = [0.9, 0.3, 0.6, 0.5, 0.5];
        assert!((roc_auc(&t, &s).unwrap() - 5.5 / 6.0).abs() < 1e-12);
        assert!(roc_auc(&[true, true], &[0.1, 0.2]).is_none());
    }

    #[test]
    fn kappa_perfect_and_dice_by_hand() {
        let cm = vec![vec![3, 0, 0], vec![0, 2, 0], vec![0, 0, 4]];
        assert!((quadratic_kappa(&cm) - 1.0).abs() < 1e-12);
        // one image: intersection 2, pred 3, truth 5 -> dice 4/8, iou 2/6
        let m = segmentation(&[vec![[0.0, 0.0, 0.0], [2.0, 3.0, 5.0]]]);
        assert!((m["dice"] - 0.5).abs() < 1e-12 && (m["iou"] - 2.0 / 6.0).abs() < 1e-12);
    }
}
