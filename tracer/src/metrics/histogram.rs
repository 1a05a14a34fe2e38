//! A Prometheus histogram that also takes observations counted elsewhere, already in its
//! buckets: the kernel's DNS summaries count exchanges per duration bucket.

use std::sync::{Arc, Mutex};

use prometheus_client::{
    encoding::{EncodeMetric, MetricEncoder, NoLabelSet},
    metrics::{MetricType, TypedMetric},
};

#[derive(Clone, Debug)]
pub struct BucketedHistogram {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Debug)]
struct Inner {
    sum: f64,
    count: u64,
    /// (upper bound, observations in this bucket only); the last bound is +Inf.
    buckets: Vec<(f64, u64)>,
}

impl BucketedHistogram {
    /// A histogram with these upper bounds (ascending) and an unbounded last bucket.
    pub fn new(bounds: impl IntoIterator<Item = f64>) -> Self {
        let buckets = bounds
            .into_iter()
            .chain([f64::INFINITY])
            .map(|bound| (bound, 0))
            .collect();
        Self {
            inner: Arc::new(Mutex::new(Inner {
                sum: 0.0,
                count: 0,
                buckets,
            })),
        }
    }

    pub fn observe(&self, value: f64) {
        let mut inner = self.inner.lock().expect("not poisoned");
        let bucket = inner
            .buckets
            .iter()
            .position(|(bound, _)| value <= *bound)
            .unwrap_or(inner.buckets.len() - 1);
        inner.add(bucket, 1, value);
    }

    /// Adds `count` observations summing to `sum`, all in bucket `bucket` (counted from
    /// 0, the first bound; past the last, the unbounded bucket).
    pub fn add_bucketed(&self, bucket: usize, count: u64, sum: f64) {
        let mut inner = self.inner.lock().expect("not poisoned");
        let bucket = bucket.min(inner.buckets.len() - 1);
        inner.add(bucket, count, sum);
    }
}

impl Inner {
    fn add(&mut self, bucket: usize, count: u64, sum: f64) {
        self.sum += sum;
        self.count += count;
        self.buckets[bucket].1 += count;
    }
}

impl TypedMetric for BucketedHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for BucketedHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let inner = self.inner.lock().expect("not poisoned");
        encoder.encode_histogram::<NoLabelSet>(inner.sum, inner.count, &inner.buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::{encoding::text::encode, registry::Registry};

    use super::*;

    #[test]
    fn bucketed_and_single_observations_add_up() {
        let histogram = BucketedHistogram::new([0.001, 0.002]);
        histogram.observe(0.0015);
        histogram.add_bucketed(0, 3, 0.0024);
        histogram.add_bucketed(9, 1, 5.0);
        let mut registry = Registry::default();
        registry.register("t", "test", histogram.clone());
        let mut text = String::new();
        encode(&mut text, &registry).unwrap();
        for line in [
            "t_sum 5.0039",
            "t_count 5",
            "t_bucket{le=\"0.001\"} 3",
            "t_bucket{le=\"0.002\"} 4",
            "t_bucket{le=\"+Inf\"} 5",
        ] {
            assert!(text.contains(line), "{line} not in:\n{text}");
        }
    }
}
