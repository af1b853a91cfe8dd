//! [`Metrics`]: a node's counters for Prometheus (`donate serve --metrics`).
//!
//! Counting happens on the hot path (every job, connection and upload), so
//! each count is one relaxed atomic add on a value the host holds: the
//! counters and gauges are `prometheus-client`'s (atomics inside), the two
//! histograms are fixed atomic buckets of our own. Only failures (rare) go
//! through a labelled family, which takes a lock. The text is produced at
//! scrape time, off the hot path.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::{Registry, Unit};

/// A node's counters. Create one, hand it to the node with
/// [`NodeConfig::metrics`](crate::NodeConfig::metrics), and [`encode`](Metrics::encode)
/// it whenever `/metrics` is scraped.
#[derive(Debug, Default)]
pub struct Metrics {
    pub(crate) connections_open: Gauge,
    pub(crate) connections_total: Counter,
    pub(crate) connections_refused: Counter,
    /// Connections closed, by the code of why (`peer_closed`, `idle_timeout`,
    /// `unknown_key`, `handshake_failed`, …).
    pub(crate) connections_closed: Family<Reason, Counter>,
    pub(crate) jobs_queued: Gauge,
    pub(crate) jobs_running: Gauge,
    /// Successful jobs: `infer`, `prompt`.
    pub(crate) jobs_done: [Counter; 2],
    pub(crate) jobs_failed: Family<Failure, Counter>,
    /// Queued jobs the core removed before they ran: cancelled, past their
    /// deadline, or dropped with their connection.
    pub(crate) jobs_removed_queued: [AtomicU64; 3],
    pub(crate) job_seconds: AtomicHistogram,
    pub(crate) queue_wait_seconds: AtomicHistogram,
    pub(crate) upload_bytes: Counter,
    pub(crate) models_mounted: Counter,
    pub(crate) mounts_failed: Counter,
    /// `model_use`s mounted from the store, and those it could not serve.
    pub(crate) store_hits: Counter,
    pub(crate) store_misses: Counter,
    /// The store's size: bytes (models and partial uploads) and models, when there is one.
    pub(crate) store_bytes: Gauge,
    pub(crate) store_models: Gauge,
    pub(crate) draining: AtomicBool,
    /// The last job ended with an executor failure (`executor_panicked`,
    /// `worker_unavailable`); cleared by the next job that does not.
    pub(crate) executor_failed: AtomicBool,
}

/// The label of a failed job.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(crate) struct Failure {
    pub(crate) kind: &'static str,
    pub(crate) code: String,
}

/// Why a connection closed.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(crate) struct Reason {
    pub(crate) reason: &'static str,
}

/// Job codes that say the executor itself is broken, for `/healthz`.
const EXECUTOR_FAILURES: [&str; 2] = ["executor_panicked", "worker_unavailable"];

impl Metrics {
    /// The Prometheus text exposition (OpenMetrics 1.0, as `prometheus-client`
    /// writes it), metric names prefixed `donate_`.
    pub fn encode(&self) -> String {
        let mut registry = Registry::with_prefix("donate");
        registry.register(
            "connections_open",
            "Connections open now",
            self.connections_open.clone(),
        );
        registry.register(
            "connections",
            "Connections accepted (refused ones included)",
            self.connections_total.clone(),
        );
        registry.register(
            "connections_refused",
            "Connections refused at once (over max_connections, or shutting down)",
            self.connections_refused.clone(),
        );
        registry.register(
            "connections_closed",
            "Connections closed, by reason (handshake_failed, unknown_key, secure_required: secure mode failures)",
            self.connections_closed.clone(),
        );
        registry.register(
            "jobs_queued",
            "Jobs waiting in the queue",
            self.jobs_queued.clone(),
        );
        registry.register(
            "jobs_running",
            "Jobs a worker is running",
            self.jobs_running.clone(),
        );
        let done = Family::<KindLabel, Counter>::default();
        for (kind, counter) in ["infer", "prompt"].into_iter().zip(&self.jobs_done) {
            done.get_or_create(&KindLabel { kind })
                .inc_by(counter.get());
        }
        registry.register("jobs_done", "Jobs answered ok, by kind", done);
        registry.register(
            "jobs_failed",
            "Jobs run and answered ok:false, by kind and code",
            self.jobs_failed.clone(),
        );
        let removed = Family::<RemovedLabel, Counter>::default();
        let whys = ["cancelled", "deadline_exceeded", "connection_closed"];
        for (why, n) in whys.into_iter().zip(&self.jobs_removed_queued) {
            removed
                .get_or_create(&RemovedLabel { why })
                .inc_by(n.load(Ordering::Relaxed));
        }
        registry.register(
            "jobs_removed_queued",
            "Queued jobs removed before they ran, by why",
            removed,
        );
        registry.register_with_unit(
            "job",
            "Time a worker spent on a job",
            Unit::Seconds,
            self.job_seconds.snapshot(),
        );
        registry.register_with_unit(
            "queue_wait",
            "Time a job waited in the queue before a worker took it",
            Unit::Seconds,
            self.queue_wait_seconds.snapshot(),
        );
        registry.register(
            "upload_bytes",
            "Model bytes of committed uploads",
            self.upload_bytes.clone(),
        );
        registry.register(
            "models_mounted",
            "Uploads mounted",
            self.models_mounted.clone(),
        );
        registry.register(
            "mounts_failed",
            "Uploads refused at mount",
            self.mounts_failed.clone(),
        );
        registry.register(
            "store_hits",
            "model_use requests mounted from the model store",
            self.store_hits.clone(),
        );
        registry.register(
            "store_misses",
            "model_use requests the model store could not serve (not held, or corrupt)",
            self.store_misses.clone(),
        );
        registry.register_with_unit(
            "store",
            "Bytes the model store holds (models and broken uploads)",
            prometheus_client::registry::Unit::Bytes,
            self.store_bytes.clone(),
        );
        registry.register(
            "store_models",
            "Models the model store holds",
            self.store_models.clone(),
        );
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry)
            .expect("writing to a String never fails");
        out
    }

    /// Whether the node takes work: not draining, and its executor's last
    /// job did not fail as broken. What `/healthz` answers 200 or 503 for.
    pub fn healthy(&self) -> Result<(), &'static str> {
        if self.draining.load(Ordering::Relaxed) {
            Err("draining")
        } else if self.executor_failed.load(Ordering::Relaxed) {
            Err("executor failed")
        } else {
            Ok(())
        }
    }

    /// Copies what only the node knows (its queue's depth, the jobs it
    /// removed itself); called with the host's lock held, so plain stores.
    pub(crate) fn note_node<M>(&self, node: &donate_proto::Node<M>) {
        self.jobs_queued.set(node.queue_status().depth);
        let stats = node.stats();
        let removed = [
            stats.cancelled_queued,
            stats.expired_queued,
            stats.dropped_queued,
        ];
        for (slot, n) in self.jobs_removed_queued.iter().zip(removed) {
            slot.store(n, Ordering::Relaxed);
        }
    }

    /// Counts a job's end: `kind` 0 infer, 1 prompt; `code` its error code.
    pub(crate) fn job_ended(&self, kind: usize, code: Option<&str>, ran: Duration) {
        self.job_seconds.observe(ran);
        match code {
            None => {
                self.jobs_done[kind].inc();
            }
            Some(code) => {
                let kind = ["infer", "prompt"][kind];
                self.jobs_failed
                    .get_or_create(&Failure {
                        kind,
                        code: code.to_owned(),
                    })
                    .inc();
            }
        }
        let broken = code.is_some_and(|c| EXECUTOR_FAILURES.contains(&c));
        if broken != self.executor_failed.load(Ordering::Relaxed) {
            self.executor_failed.store(broken, Ordering::Relaxed);
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RemovedLabel {
    why: &'static str,
}

/// Upper bounds of the duration buckets, in seconds: 1 ms to 5 min.
const BUCKETS: [f64; 14] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 30.0, 60.0, 300.0,
];

/// A histogram of durations with one atomic per bucket: observing is a
/// search of 14 bounds and three relaxed atomic adds, never a lock.
#[derive(Debug, Default)]
pub(crate) struct AtomicHistogram {
    /// Per bucket (and a last one for +Inf), not cumulative.
    counts: [AtomicU64; BUCKETS.len() + 1],
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

impl AtomicHistogram {
    pub(crate) fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let at = BUCKETS
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(BUCKETS.len());
        self.counts[at].fetch_add(1, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    fn snapshot(&self) -> HistogramSnapshot {
        let buckets = BUCKETS
            .iter()
            .copied()
            .chain([f64::INFINITY])
            .zip(&self.counts)
            .map(|(bound, n)| (bound, n.load(Ordering::Relaxed)))
            .collect();
        HistogramSnapshot {
            sum: self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9,
            count: self.count.load(Ordering::Relaxed),
            buckets,
        }
    }
}

/// A histogram's values at scrape time, as the registry encodes them.
#[derive(Debug)]
struct HistogramSnapshot {
    sum: f64,
    count: u64,
    buckets: Vec<(f64, u64)>,
}

impl TypedMetric for HistogramSnapshot {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for HistogramSnapshot {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_histogram::<NoLabelSet>(
            self.sum,
            self.count,
            &self.buckets,
            None::<&HashMap<usize, _>>,
        )
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}
