//! `Range: bytes=...` for blob requests (one range; anything else is served whole).

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeRequest {
    /// Serve the whole body with 200.
    Full,
    /// Serve `start..=end` with 206.
    Partial { start: u64, end: u64 },
    /// 416.
    Unsatisfiable,
}

/// Resolves a `Range` header against a body of `size` bytes. Syntactically
/// invalid or multi-range headers are ignored, as RFC 9110 allows.
pub fn resolve(header: Option<&str>, size: u64) -> RangeRequest {
    let Some(spec) = header.and_then(|h| h.trim().strip_prefix("bytes=")) else {
        return RangeRequest::Full;
    };
    if spec.contains(',') {
        return RangeRequest::Full;
    }
    let Some((first, last)) = spec.trim().split_once('-') else {
        return RangeRequest::Full;
    };
    let num = |s: &str| -> Option<u64> {
        let s = s.trim();
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    match (first.trim().is_empty(), num(first), num(last)) {
        // bytes=-N: the last N bytes.
        (true, _, Some(n)) => {
            if n == 0 || size == 0 {
                RangeRequest::Unsatisfiable
            } else {
                RangeRequest::Partial {
                    start: size.saturating_sub(n),
                    end: size - 1,
                }
            }
        }
        (false, Some(start), end) if last.trim().is_empty() || end.is_some() => {
            if start >= size {
                return RangeRequest::Unsatisfiable;
            }
            match end {
                Some(e) if e < start => RangeRequest::Full,
                Some(e) => RangeRequest::Partial {
                    start,
                    end: e.min(size - 1),
                },
                None => RangeRequest::Partial {
                    start,
                    end: size - 1,
                },
            }
        }
        _ => RangeRequest::Full,
    }
}

#[cfg(test)]
mod tests {
    use super::RangeRequest::*;
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(resolve(None, 10), Full);
        assert_eq!(resolve(Some("bytes=0-0"), 10), Partial { start: 0, end: 0 });
        assert_eq!(resolve(Some("bytes=2-"), 10), Partial { start: 2, end: 9 });
        assert_eq!(
            resolve(Some("bytes=2-100"), 10),
            Partial { start: 2, end: 9 }
        );
        assert_eq!(resolve(Some("bytes=-3"), 10), Partial { start: 7, end: 9 });
        assert_eq!(resolve(Some("bytes=-30"), 10), Partial { start: 0, end: 9 });
        assert_eq!(resolve(Some("bytes=10-"), 10), Unsatisfiable);
        assert_eq!(resolve(Some("bytes=-0"), 10), Unsatisfiable);
        assert_eq!(resolve(Some("bytes=5-2"), 10), Full);
        assert_eq!(resolve(Some("bytes=0-1,3-4"), 10), Full);
        assert_eq!(resolve(Some("items=0-1"), 10), Full);
        assert_eq!(resolve(Some("bytes=a-b"), 10), Full);
        assert_eq!(resolve(Some("bytes=+1-2"), 10), Full);
        assert_eq!(resolve(Some("bytes=99999999999999999999999-"), 10), Full);
    }
}
