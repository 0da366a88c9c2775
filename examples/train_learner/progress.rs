//! A metrics renderer for runs without a terminal (a CI log, `nohup`, a pipe): one plain
//! line every few seconds and at the end of each split, where burn-train's own renderers
//! draw a dashboard (which needs a terminal) or print a line per batch.

use std::collections::HashMap;
use std::time::Instant;

use burn::train::LearnerSummary;
use burn::train::logger::{EvaluationProgressLogger, TrainingProgressLogger};
use burn::train::metric::{MetricDefinition, MetricEntry, MetricId};
use burn::train::renderer::{
    EvaluationName, MetricState, MetricsRenderer, MetricsRendererEvaluation,
    MetricsRendererTraining,
};

/// Prints `epoch e/E | split items/total | metrics | tokens/s | eta` every `every` seconds.
pub struct PlainProgress {
    every: f64,
    tokens_per_item: usize,
    names: HashMap<MetricId, String>,
    latest: Vec<(MetricId, String)>,
    epoch: (usize, usize),
    split: String,
    items: (usize, usize),
    started: Instant,
    split_started: Instant,
    last_line: Instant,
}

impl PlainProgress {
    /// A renderer that prints every `every` seconds; each item is `tokens_per_item` tokens.
    pub fn new(every: f64, tokens_per_item: usize) -> Self {
        Self {
            every,
            tokens_per_item,
            names: HashMap::new(),
            latest: Vec::new(),
            epoch: (0, 0),
            split: "train".into(),
            items: (0, 0),
            started: Instant::now(),
            split_started: Instant::now(),
            last_line: Instant::now(),
        }
    }

    /// Keeps the latest formatted value of a metric.
    fn record(&mut self, entry: MetricEntry) {
        let text = entry.serialized_entry.formatted;
        match self
            .latest
            .iter_mut()
            .find(|(id, _)| *id == entry.metric_id)
        {
            Some(slot) => slot.1 = text,
            None => self.latest.push((entry.metric_id, text)),
        }
    }

    /// Prints the line now.
    fn print(&mut self) {
        self.last_line = Instant::now();
        let seconds = self.split_started.elapsed().as_secs_f64().max(1e-9);
        let (done, total) = self.items;
        let rate = done as f64 / seconds;
        let eta = if rate > 0.0 {
            format!("{:.0} s", total.saturating_sub(done) as f64 / rate)
        } else {
            "?".into()
        };
        let metrics: Vec<String> = self
            .latest
            .iter()
            .map(|(id, text)| {
                let name = self.names.get(id).map_or("?", String::as_str);
                format!("{name} {text}")
            })
            .collect();
        println!(
            "epoch {}/{} | {} {done}/{total} | {} | {:.0} tok/s | split eta {eta} | {:.0} s",
            self.epoch.0,
            self.epoch.1,
            self.split,
            metrics.join(" | "),
            rate * self.tokens_per_item as f64,
            self.started.elapsed().as_secs_f64(),
        );
    }

    /// Prints when `every` seconds have passed since the last line.
    fn maybe_print(&mut self) {
        if self.last_line.elapsed().as_secs_f64() >= self.every {
            self.print();
        }
    }

    fn start_split_named(&mut self, split: &str, total: usize) {
        self.split = split.to_string();
        self.items = (0, total);
        self.latest.clear();
        self.split_started = Instant::now();
    }
}

impl MetricsRendererTraining for PlainProgress {
    fn update_train(&mut self, state: MetricState) {
        let (MetricState::Generic(entry) | MetricState::Numeric(entry, _)) = state;
        self.record(entry);
    }

    fn update_valid(&mut self, state: MetricState) {
        self.update_train(state);
    }

    fn on_train_end(
        &mut self,
        summary: Option<LearnerSummary>,
    ) -> Result<(), Box<dyn core::error::Error>> {
        if let Some(summary) = summary {
            println!("{summary}");
        }
        Ok(())
    }
}

impl TrainingProgressLogger for PlainProgress {
    fn start(
        &mut self,
        total: usize,
        starting: usize,
        _items: Option<usize>,
        _label: Option<&str>,
    ) {
        self.epoch = (starting, total);
        self.started = Instant::now();
    }

    fn update_epoch(&mut self, epoch: usize) {
        self.epoch.0 = epoch + 1;
    }

    fn start_split(&mut self, split: &str, total_items: usize) {
        self.start_split_named(split, total_items);
    }

    fn update_split(&mut self, items_processed: usize) {
        self.items.0 = items_processed;
        self.maybe_print();
    }

    fn end_split(&mut self) {
        self.print();
    }

    fn end(&mut self) {}

    /// Events (one per iteration) would be a line per step again.
    fn log_event_training(&mut self, _event: String) {}
}

impl EvaluationProgressLogger for PlainProgress {
    fn start_global_progress(&mut self, _total_tests: usize) {}

    fn start_test(&mut self, name: &str, total_items: usize) {
        self.start_split_named(name, total_items);
    }

    fn update_test_progress(&mut self, items_processed: usize) {
        self.items.0 = items_processed;
        self.maybe_print();
    }

    fn end_test(&mut self) {
        self.print();
    }

    fn end_global_progress(&mut self) {}

    fn log_event_evaluation(&mut self, _event: String) {}
}

impl MetricsRendererEvaluation for PlainProgress {
    fn update_test(&mut self, _name: EvaluationName, state: MetricState) {
        self.update_train(state);
    }
}

impl MetricsRenderer for PlainProgress {
    fn manual_close(&mut self) {}

    fn register_metric(&mut self, definition: MetricDefinition) {
        self.names
            .insert(definition.metric_id, definition.name.to_string());
    }
}
