//! Medians and percentiles.

/// Median of `v` (NaN when empty).
pub fn median(v: &[f64]) -> f64 {
    percentile(v, 50.0)
}

/// Nearest-rank percentile `p` (0..=100) of `v`; NaN when empty.
pub fn percentile(v: &[f64], p: f64) -> f64 {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| !x.is_nan()).collect();
    if s.is_empty() {
        return f64::NAN;
    }
    s.sort_by(f64::total_cmp);
    if p >= 100.0 {
        return s[s.len() - 1];
    }
    if (p - 50.0).abs() < f64::EPSILON && s.len().is_multiple_of(2) {
        let m = s.len() / 2;
        return (s[m - 1] + s[m]) / 2.0;
    }
    let rank = ((p / 100.0) * s.len() as f64).ceil() as usize;
    s[rank.clamp(1, s.len()) - 1]
}

/// Largest value (NaN when empty).
pub fn max(v: &[f64]) -> f64 {
    percentile(v, 100.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_percentiles() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(max(&v), 100.0);
        assert!(median(&[]).is_nan());
    }
}
