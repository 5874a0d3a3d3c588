//! Latency samples and their percentiles.

use serde::Serialize;
use std::time::Duration;

/// Percentiles of a set of latencies, in microseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Percentiles {
    pub count: usize,
    pub p10_us: f64,
    pub p25_us: f64,
    pub p50_us: f64,
    pub p75_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
}

pub fn percentiles(mut samples: Vec<Duration>) -> Percentiles {
    if samples.is_empty() {
        return Percentiles::default();
    }
    samples.sort_unstable();
    let at = |q: f64| {
        let index = ((samples.len() as f64 - 1.0) * q).round() as usize;
        samples[index.min(samples.len() - 1)].as_secs_f64() * 1e6
    };
    Percentiles {
        count: samples.len(),
        p10_us: at(0.10),
        p25_us: at(0.25),
        p50_us: at(0.50),
        p75_us: at(0.75),
        p90_us: at(0.90),
        p99_us: at(0.99),
        max_us: at(1.0),
    }
}

/// Microseconds as a short human figure (`850µs`, `1.25ms`, `2.1s`).
pub fn human_us(us: f64) -> String {
    if us < 1000.0 {
        format!("{us:.0}µs")
    } else if us < 1_000_000.0 {
        format!("{:.2}ms", us / 1000.0)
    } else {
        format!("{:.2}s", us / 1e6)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_a_ramp() {
        let samples: Vec<_> = (1..=100).map(Duration::from_micros).collect();
        let p = percentiles(samples);
        assert_eq!(p.count, 100);
        assert!((p.p50_us - 50.0).abs() <= 1.0, "{p:?}");
        assert!((p.p99_us - 99.0).abs() <= 1.0, "{p:?}");
        assert_eq!(p.max_us, 100.0);
    }
}
