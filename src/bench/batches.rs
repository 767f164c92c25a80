//! The server's batch sizes as its `/metrics` reports them: the `slotserve_batch_size`
//! histogram of each model stage, and what one stretch of load added to it.

use std::collections::BTreeMap;

use serde::Serialize;

/// The histogram's name in the Prometheus text.
const METRIC: &str = "slotserve_batch_size";

/// The batch-size histogram of each model stage, by stage name.
pub type Stages = BTreeMap<String, BatchHistogram>;

/// One stage's batch-size histogram, as cumulative Prometheus buckets.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BatchHistogram {
    /// Batches run.
    pub batches: u64,
    /// Items (images or jobs) in all those batches.
    pub items: f64,
    /// (upper bound, batches of at most that size), by increasing bound.
    buckets: Vec<(f64, u64)>,
}

/// Batches of one size range.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SizeCount {
    /// The sizes: `4`, or a range `5-6`, or `>64`.
    pub sizes: String,
    /// Batches with a size in that range.
    pub batches: u64,
}

/// What a stretch of load did to one stage's batches.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BatchSummary {
    /// Batches run.
    pub batches: u64,
    /// Mean batch size.
    pub mean: f64,
    /// Batches per size range, only the ranges that occurred.
    pub histogram: Vec<SizeCount>,
}

/// The batch-size histogram of every stage (`decompose`, `denoise`, `decode`) in a
/// Prometheus text exposition.
pub fn parse(metrics: &str) -> Stages {
    let mut stages = Stages::new();
    for line in metrics.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else { continue };
        let Some((name, labels)) = series.split_once('{') else { continue };
        let (Some(kind), Ok(value)) = (name.strip_prefix(METRIC), value.parse::<f64>()) else {
            continue;
        };
        let labels = parse_labels(labels.trim_end_matches('}'));
        let Some(stage) = labels.get("stage") else { continue };
        let histogram = stages.entry(stage.clone()).or_default();
        match (kind, labels.get("le")) {
            ("_count", _) => histogram.batches = value as u64,
            ("_sum", _) => histogram.items = value,
            ("_bucket", Some(le)) => histogram.buckets.push((parse_bound(le), value as u64)),
            _ => {}
        }
    }
    for histogram in stages.values_mut() {
        histogram.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    stages
}

/// What each stage gained from `before` to `after`, two readings of one server.
pub fn gained(before: &Stages, after: &Stages) -> Stages {
    after
        .iter()
        .map(|(stage, h)| {
            (stage.clone(), h.since(before.get(stage).unwrap_or(&Default::default())))
        })
        .collect()
}

/// Adds the batches of `more` (gains of other stretches of load) to `total`.
pub fn add(total: &mut Stages, more: &Stages) {
    for (stage, h) in more {
        let sum = total.entry(stage.clone()).or_default();
        sum.batches += h.batches;
        sum.items += h.items;
        for &(bound, count) in &h.buckets {
            match sum.buckets.iter_mut().find(|(b, _)| *b == bound) {
                Some((_, total)) => *total += count,
                None => sum.buckets.push((bound, count)),
            }
        }
        sum.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
}

/// `a="x",b="y"` as a map.
fn parse_labels(labels: &str) -> BTreeMap<&str, String> {
    labels
        .split(',')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (k.trim(), v.trim().trim_matches('"').to_string()))
        .collect()
}

/// A bucket bound: a number or `+Inf`.
fn parse_bound(le: &str) -> f64 {
    match le {
        "+Inf" => f64::INFINITY,
        _ => le.parse().unwrap_or(f64::INFINITY),
    }
}

impl BatchHistogram {
    /// What was added since `before` (an earlier reading of the same server).
    pub fn since(&self, before: &BatchHistogram) -> BatchHistogram {
        let earlier = |bound: f64| {
            before.buckets.iter().find(|(b, _)| *b == bound).map_or(0, |&(_, count)| count)
        };
        BatchHistogram {
            batches: self.batches.saturating_sub(before.batches),
            items: self.items - before.items,
            buckets: self
                .buckets
                .iter()
                .map(|&(bound, count)| (bound, count.saturating_sub(earlier(bound))))
                .collect(),
        }
    }

    /// Batch count, mean size and the size ranges that occurred.
    pub fn summary(&self) -> BatchSummary {
        let mut histogram = Vec::new();
        let (mut lower, mut below) = (0.0, 0);
        for &(bound, cumulative) in &self.buckets {
            let batches = cumulative.saturating_sub(below);
            if batches > 0 {
                histogram.push(SizeCount { sizes: size_range(lower, bound), batches });
            }
            (lower, below) = (bound, cumulative);
        }
        let mean = match self.batches {
            0 => 0.0,
            n => self.items / n as f64,
        };
        BatchSummary { batches: self.batches, mean, histogram }
    }
}

/// The integer sizes in (lower, upper]: `4`, `5-6` or `>64`.
fn size_range(lower: f64, upper: f64) -> String {
    let first = lower.floor() as u64 + 1;
    match upper {
        u if u.is_infinite() => format!(">{}", lower as u64),
        u if u as u64 <= first => format!("{}", u as u64),
        u => format!("{first}-{}", u as u64),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exposition(denoise: [u64; 5], sum: f64) -> String {
        let [b1, b2, b4, b8, inf] = denoise;
        format!(
            "# TYPE slotserve_batch_size histogram\n\
             slotserve_batch_size_bucket{{stage=\"denoise\",le=\"1\"}} {b1}\n\
             slotserve_batch_size_bucket{{stage=\"denoise\",le=\"2\"}} {b2}\n\
             slotserve_batch_size_bucket{{stage=\"denoise\",le=\"4\"}} {b4}\n\
             slotserve_batch_size_bucket{{stage=\"denoise\",le=\"8\"}} {b8}\n\
             slotserve_batch_size_bucket{{stage=\"denoise\",le=\"+Inf\"}} {inf}\n\
             slotserve_batch_size_sum{{stage=\"denoise\"}} {sum}\n\
             slotserve_batch_size_count{{stage=\"denoise\"}} {inf}\n\
             slotserve_requests_total{{endpoint=\"/render\",status=\"200\"}} 3\n"
        )
    }

    #[test]
    fn reads_the_histogram_of_each_stage() {
        let stages = parse(&exposition([2, 2, 5, 5, 5], 11.0));
        assert_eq!(stages.keys().collect::<Vec<_>>(), ["denoise"]);
        let summary = stages["denoise"].summary();
        assert_eq!(summary.batches, 5);
        assert!((summary.mean - 2.2).abs() < 1e-9);
        let ranges: Vec<(&str, u64)> =
            summary.histogram.iter().map(|s| (s.sizes.as_str(), s.batches)).collect();
        assert_eq!(ranges, [("1", 2), ("3-4", 3)]);
    }

    #[test]
    fn load_is_the_difference_of_two_readings() {
        let before = parse(&exposition([2, 2, 5, 5, 5], 11.0));
        let after = parse(&exposition([2, 3, 6, 8, 8], 26.0));
        let added = after["denoise"].since(&before["denoise"]).summary();
        assert_eq!(added.batches, 3);
        assert!((added.mean - 5.0).abs() < 1e-9);
        let ranges: Vec<(&str, u64)> =
            added.histogram.iter().map(|s| (s.sizes.as_str(), s.batches)).collect();
        assert_eq!(ranges, [("2", 1), ("5-8", 2)]);
        let first = after["denoise"].since(&BatchHistogram::default()).summary();
        assert_eq!(first.batches, 8);
    }

    #[test]
    fn gains_of_several_stretches_add_up() {
        let start = parse(&exposition([2, 2, 5, 5, 5], 11.0));
        let middle = parse(&exposition([2, 3, 6, 8, 8], 26.0));
        let end = parse(&exposition([4, 5, 8, 10, 10], 28.0));
        let mut total = Stages::new();
        add(&mut total, &gained(&start, &middle));
        add(&mut total, &gained(&middle, &end));
        assert_eq!(total, gained(&start, &end));
        assert_eq!(total["denoise"].summary().batches, 5);
    }

    #[test]
    fn sizes_beyond_the_last_bound_are_open_ended() {
        assert_eq!(size_range(64.0, f64::INFINITY), ">64");
        assert_eq!(size_range(0.0, 1.0), "1");
        assert_eq!(size_range(12.0, 16.0), "13-16");
    }
}
