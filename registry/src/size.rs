//! Byte sizes as people write them: `50Gi`, `500MiB`, `10G`, `1048576`: the
//! cache's `--max-size` flag and the `max_size` of its configuration file.

/// Parses a byte size. Binary suffixes (`Ki`, `Mi`, `Gi`, `Ti`, optionally with
/// `B`) are powers of 1024, as in Kubernetes quantities; decimal ones (`K`/`k`,
/// `M`, `G`, `T`, optionally with `B`) are powers of 1000.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (examples: 50Gi, 500Mi, 1048576)"))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "Ki" | "KiB" => 1 << 10,
        "Mi" | "MiB" => 1 << 20,
        "Gi" | "GiB" => 1 << 30,
        "Ti" | "TiB" => 1 << 40,
        "k" | "K" | "KB" | "kB" => 1_000,
        "M" | "MB" => 1_000_000,
        "G" | "GB" => 1_000_000_000,
        "T" | "TB" => 1_000_000_000_000,
        other => {
            return Err(format!(
                "{s:?}: unknown unit {other:?} (use Ki, Mi, Gi, Ti or K, M, G, T)"
            ));
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        assert_eq!(parse_size("50Gi"), Ok(50 << 30));
        assert_eq!(parse_size("500MiB"), Ok(500 << 20));
        assert_eq!(parse_size("10G"), Ok(10_000_000_000));
        assert_eq!(parse_size(" 8Ki "), Ok(8192));
        assert_eq!(parse_size("2k"), Ok(2000));
        assert!(parse_size("").is_err());
        assert!(parse_size("Gi").is_err());
        assert!(parse_size("5 parsecs").is_err());
        assert!(parse_size("-1Gi").is_err());
        assert!(parse_size("99999999999Ti").is_err());
    }
}
