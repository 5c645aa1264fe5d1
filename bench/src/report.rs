//! The markdown report: one table per scenario with medians, ratios and targets.

use std::fmt::Write;

use crate::stats::{max, median};
use crate::systems::Kind;

/// A target and how it is checked against the samples.
#[derive(Debug, Clone)]
pub enum Check {
    /// median(ours) / median(dist) >= x
    RatioAtLeast(f64),
    /// median(ours) / median(dist) <= x
    RatioAtMost(f64),
    /// median(ours) < median(dist)
    Lower,
    /// every run of ours <= x
    OursMaxAtMost(f64),
    /// median(ours) <= x: for a ratio measured side by side in every run,
    /// where one run is a few dozen CPU ticks and noisy both ways
    OursMedianAtMost(f64),
    /// median(ours) >= x: likewise, for a ratio that must stay high
    OursMedianAtLeast(f64),
    /// every run of ours == x (within 1e-9)
    OursAlways(f64),
}

impl Check {
    /// Whether the check compares ours with distribution (so the row needs
    /// samples of both); the others judge ours alone (ratios measured
    /// within ours' own runs, absolute bounds).
    pub fn needs_distribution(&self) -> bool {
        matches!(
            self,
            Self::RatioAtLeast(_) | Self::RatioAtMost(_) | Self::Lower
        )
    }
}

/// One metric: samples per run for each system, an optional reference, a target.
#[derive(Debug, Clone)]
pub struct Row {
    pub metric: String,
    pub ours: Vec<f64>,
    pub dist: Vec<f64>,
    pub reference: Vec<f64>,
    pub target: Option<(String, Check)>,
}

impl Row {
    pub fn new(metric: impl Into<String>) -> Self {
        Self {
            metric: metric.into(),
            ours: Vec::new(),
            dist: Vec::new(),
            reference: Vec::new(),
            target: None,
        }
    }

    /// Whether the target holds; `None` without a target or without data.
    pub fn holds(&self) -> Option<bool> {
        let (_, check) = self.target.as_ref()?;
        if self.ours.is_empty() {
            return None;
        }
        let (o, d) = (median(&self.ours), median(&self.dist));
        Some(match check {
            Check::RatioAtLeast(x) => !d.is_nan() && o / d >= *x,
            Check::RatioAtMost(x) => !d.is_nan() && o / d <= *x,
            Check::Lower => !d.is_nan() && o < d,
            Check::OursMaxAtMost(x) => max(&self.ours) <= *x,
            Check::OursMedianAtMost(x) => o <= *x,
            Check::OursMedianAtLeast(x) => o >= *x,
            Check::OursAlways(x) => self.ours.iter().all(|v| (v - x).abs() < 1e-9),
        })
    }
}

/// One scenario's table.
#[derive(Debug, Clone)]
pub struct Section {
    pub title: String,
    pub setup: String,
    pub rows: Vec<Row>,
    pub notes: Vec<String>,
}

impl Section {
    pub fn new(title: impl Into<String>, setup: impl Into<String>) -> Self {
        Self {
            title: title.into(),
            setup: setup.into(),
            rows: Vec::new(),
            notes: Vec::new(),
        }
    }

    fn row_mut(&mut self, metric: &str) -> &mut Row {
        if let Some(i) = self.rows.iter().position(|r| r.metric == metric) {
            &mut self.rows[i]
        } else {
            self.rows.push(Row::new(metric));
            self.rows.last_mut().expect("just pushed")
        }
    }

    /// Records one run's value of `metric` for `kind`.
    pub fn add(&mut self, metric: &str, kind: Kind, v: f64) {
        let r = self.row_mut(metric);
        match kind {
            Kind::Ours => r.ours.push(v),
            Kind::Dist => r.dist.push(v),
        }
    }

    /// Records one run's reference value (sendfile ceiling, direct upstream).
    pub fn add_reference(&mut self, metric: &str, v: f64) {
        self.row_mut(metric).reference.push(v);
    }

    /// Sets the target of `metric` (creating the row if needed).
    pub fn target(&mut self, metric: &str, text: &str, check: Check) {
        self.row_mut(metric).target = Some((text.to_owned(), check));
    }

    pub fn note(&mut self, n: impl Into<String>) {
        self.notes.push(n.into());
    }
}

/// Formats a number with 3 significant-ish digits; `n/a` for NaN.
pub fn num(v: f64) -> String {
    if v.is_nan() {
        return "n/a".into();
    }
    if v.is_infinite() {
        return "inf".into();
    }
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else if a >= 0.01 {
        format!("{v:.3}")
    } else {
        format!("{v:.2e}")
    }
}

fn cell(v: &[f64]) -> String {
    if v.is_empty() {
        String::new()
    } else {
        num(median(v))
    }
}

impl Section {
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "## {}\n\n{}\n", self.title, self.setup);
        if !self.rows.is_empty() {
            let _ = writeln!(
                s,
                "| metric | regmirror | distribution | ours / dist | reference | target | holds |\n\
                 | --- | ---: | ---: | ---: | ---: | --- | --- |"
            );
            for r in &self.rows {
                let ratio = if r.ours.is_empty() || r.dist.is_empty() {
                    String::new()
                } else {
                    num(median(&r.ours) / median(&r.dist))
                };
                let holds = match r.holds() {
                    Some(true) => "yes",
                    Some(false) => "**NO**",
                    None => "",
                };
                let target = r.target.as_ref().map_or("", |(t, _)| t.as_str());
                let runs = format!("{}/{}", r.ours.len(), r.dist.len());
                let _ = writeln!(
                    s,
                    "| {} <sub>(runs {runs})</sub> | {} | {} | {ratio} | {} | {target} | {holds} |",
                    r.metric,
                    cell(&r.ours),
                    cell(&r.dist),
                    cell(&r.reference),
                );
            }
            s.push('\n');
        }
        for n in &self.notes {
            let _ = writeln!(s, "- {n}");
        }
        if !self.notes.is_empty() {
            s.push('\n');
        }
        s
    }

    /// `(metric, target, holds)` for every row with a target.
    pub fn verdicts(&self) -> Vec<(String, String, Option<bool>)> {
        self.rows
            .iter()
            .filter_map(|r| {
                r.target
                    .as_ref()
                    .map(|(t, _)| (r.metric.clone(), t.clone(), r.holds()))
            })
            .collect()
    }
}
