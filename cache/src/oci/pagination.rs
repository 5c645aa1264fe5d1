//! Listing pagination as the distribution spec defines it for `tags/list`,
//! `_catalog` and `referrers`: `n` (page size) and `last` (the item the page
//! starts after) in the query, and a `Link: <…>; rel="next"` header pointing
//! at the next page; and the tag list body (`{"name": …, "tags": […]}`) the
//! cache pages or renames on its way to the client.

use bytes::Bytes;

/// `n` and `last` from a query string (percent-decoded). An `n` that is not a
/// number is ignored, as if absent.
pub fn page_params(query: Option<&str>) -> (Option<usize>, Option<String>) {
    let mut n = None;
    let mut last = None;
    for (k, v) in url::form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match &*k {
            "n" => n = v.parse().ok(),
            "last" => last = Some(v.into_owned()),
            _ => {}
        }
    }
    (n, last)
}

/// The page of sorted `items` after `last`, at most `n` long.
pub fn paginate<'a>(items: &'a [String], n: Option<usize>, last: Option<&str>) -> &'a [String] {
    let start = match last {
        Some(l) => items.partition_point(|i| i.as_str() <= l),
        None => 0,
    };
    let end = n.map_or(items.len(), |n| (start + n).min(items.len()));
    &items[start..end]
}

/// The `Link` header value to the page after `page` of `items` (cut with
/// [`paginate`]), if there is one: `</v2/{path}?n=N&last=L>; rel="next"`.
pub fn next_page_link(
    path: &str,
    items: &[String],
    page: &[String],
    n: Option<usize>,
) -> Option<String> {
    let (n, end) = (n?, page.last()?);
    if page.len() < n || items.last() == Some(end) {
        return None;
    }
    let q = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("n", &n.to_string())
        .append_pair("last", end)
        .finish();
    Some(next_link(&format!("/v2/{path}?{q}")))
}

/// The `Link` header value to the next page at `target`, a path and query
/// on this cache: `<{target}>; rel="next"`.
pub fn next_link(target: &str) -> String {
    format!("<{target}>; rel=\"next\"")
}

/// A tag list cut here because its upstream ignored `n` and `last`.
#[derive(Debug, Clone, PartialEq)]
pub struct TagPage {
    /// The upstream's JSON object with `tags` replaced by the page.
    pub body: Bytes,
    /// The `Link` to the next page, on the path `/v2/tags/list` (the server
    /// puts the client's repository name in with [`rewrite_link`]); `None` on
    /// the last page.
    pub next: Option<String>,
}

/// Applies `query`'s `n` and `last` to an upstream tag list `body` that
/// ignored them (distribution 2.8 always sends every tag): the tags sorted,
/// deduplicated and cut with [`paginate`]. `None` when the list should be
/// relayed untouched, in the upstream's order and with its own `Link`: the
/// query asks for no page, the body is not a tag list, or the upstream
/// honoured the query (no tag at or before `last`, at most `n` tags).
pub fn page_tags(body: &[u8], query: Option<&str>) -> Option<TagPage> {
    let (n, last) = page_params(query);
    if n.is_none() && last.is_none() {
        return None;
    }
    let mut list = serde_json::from_slice::<serde_json::Value>(body).ok()?;
    let mut tags: Vec<String> = list["tags"]
        .as_array()?
        .iter()
        .filter_map(|t| t.as_str().map(str::to_owned))
        .collect();
    let ignored = n.is_some_and(|n| tags.len() > n)
        || last
            .as_deref()
            .is_some_and(|l| tags.iter().any(|t| t.as_str() <= l));
    if !ignored {
        return None;
    }
    tags.sort();
    tags.dedup();
    let page = paginate(&tags, n, last.as_deref());
    let next = next_page_link("tags/list", &tags, page, n);
    list["tags"] = serde_json::json!(page);
    Some(TagPage {
        body: list.to_string().into(),
        next,
    })
}

/// The query of a `Link` header value's `<…>` target
/// (`</v2/library/x/tags/list?last=a&n=1>; rel="next"` -> `last=a&n=1`), as
/// it is (empty when the target has none): what the cache keeps of a next
/// page link when it points the link back at itself. `None` when the value
/// has no `<…>` target.
pub fn link_query(link: &str) -> Option<&str> {
    let inner = link.split_once('<')?.1.split_once('>')?.0;
    Some(inner.split_once('?').map_or("", |(_, q)| q))
}

/// A tag list `body` (`{"name": …, "tags": […]}`) naming the repository
/// `name`: only the string value of the top-level `name` member is
/// replaced, every other byte is kept (member order, spacing, escapes, any
/// other field of the upstream's), so the client gets the upstream's body
/// but for that field. Distribution answers with the name in the request
/// path, so through the cache that is the client's name, host prefix and
/// all. `None` when `body` is not a JSON object with a string `name`, or
/// already names `name` (the caller relays it untouched).
pub fn rename_tag_list(body: &[u8], name: &str) -> Option<Bytes> {
    let list = serde_json::from_slice::<serde_json::Value>(body).ok()?;
    if list.get("name")?.as_str()? == name {
        return None;
    }
    let literal = serde_json::to_string(name).ok()?;
    let mut out = Vec::with_capacity(body.len() + literal.len());
    let mut copied = 0;
    for span in top_level_string_values(body, "name") {
        out.extend_from_slice(&body[copied..span.start]);
        out.extend_from_slice(literal.as_bytes());
        copied = span.end;
    }
    out.extend_from_slice(&body[copied..]);
    Some(out.into())
}

/// Byte ranges (quotes included) of the string values of the top-level
/// members called `key` in `body`, a JSON object already parsed as valid.
/// A scan that only tracks strings and nesting: valid JSON needs no more.
fn top_level_string_values(body: &[u8], key: &str) -> Vec<std::ops::Range<usize>> {
    let mut spans = Vec::new();
    // Inside the top-level object: is the next string a member name, and
    // was the last member name `key` (so a string after it is its value)?
    let (mut depth, mut want_key, mut keyed) = (0usize, false, false);
    let mut i = 0;
    while i < body.len() {
        match body[i] {
            b'"' => {
                let end = string_end(body, i);
                if depth == 1 && want_key {
                    let k = serde_json::from_slice::<String>(&body[i..end]);
                    keyed = k.is_ok_and(|k| k == key);
                    want_key = false;
                } else if depth == 1 && keyed {
                    spans.push(i..end);
                    keyed = false;
                }
                i = end;
                continue;
            }
            b'{' | b'[' => {
                depth += 1;
                want_key = depth == 1;
                keyed &= depth == 1;
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            b',' if depth == 1 => (want_key, keyed) = (true, false),
            _ => {}
        }
        i += 1;
    }
    spans
}

/// The index just past the JSON string starting with the quote at `start`.
fn string_end(body: &[u8], start: usize) -> usize {
    let mut i = start + 1;
    while i < body.len() {
        match body[i] {
            b'\\' => i += 2,
            b'"' => return i + 1,
            _ => i += 1,
        }
    }
    body.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_page_links_only_when_more_follow() {
        let items: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let link = |n, last| next_page_link("_catalog", &items, paginate(&items, n, last), n);
        assert_eq!(
            link(Some(2), None).as_deref(),
            Some(r#"</v2/_catalog?n=2&last=b>; rel="next""#)
        );
        assert_eq!(link(Some(2), Some("b")), None, "last page");
        assert_eq!(link(Some(3), None), None, "everything fits");
        assert_eq!(link(None, None), None);
    }

    #[test]
    fn pagination() {
        let items: Vec<String> = ["a", "b", "c", "d"].iter().map(|s| s.to_string()).collect();
        assert_eq!(paginate(&items, None, None), &items[..]);
        assert_eq!(paginate(&items, Some(2), None), &items[..2]);
        assert_eq!(paginate(&items, Some(2), Some("b")), &items[2..4]);
        assert_eq!(paginate(&items, Some(10), Some("bb")), &items[2..]);
        assert!(paginate(&items, None, Some("z")).is_empty());
        assert!(paginate(&items, Some(0), None).is_empty());
        assert_eq!(
            page_params(Some("n=3&last=x%2Fy")),
            (Some(3), Some("x/y".into()))
        );
    }

    fn tag_list(tags: &[&str]) -> Vec<u8> {
        serde_json::json!({"name": "app", "tags": tags})
            .to_string()
            .into_bytes()
    }

    fn tags_of(p: &TagPage) -> Vec<String> {
        let v: serde_json::Value = serde_json::from_slice(&p.body).unwrap();
        assert_eq!(v["name"], "app", "other fields kept");
        serde_json::from_value(v["tags"].clone()).unwrap()
    }

    #[test]
    fn tag_pages_are_cut_when_the_upstream_ignores_n_and_last() {
        let all = tag_list(&["v2", "latest", "v1", "multi"]);
        // OCI conformance: every tag after `last`, none before.
        let p = page_tags(&all, Some("last=latest")).unwrap();
        assert_eq!(tags_of(&p), ["multi", "v1", "v2"]);
        assert_eq!(p.next, None);
        let p = page_tags(&all, Some("n=2")).unwrap();
        assert_eq!(tags_of(&p), ["latest", "multi"]);
        assert_eq!(
            p.next.as_deref(),
            Some(r#"</v2/tags/list?n=2&last=multi>; rel="next""#)
        );
        let p = page_tags(&all, Some("n=2&last=multi")).unwrap();
        assert_eq!(tags_of(&p), ["v1", "v2"]);
        assert_eq!(p.next, None, "last page");
    }

    #[test]
    fn tag_pages_the_upstream_made_are_relayed_untouched() {
        for (tags, query) in [
            (&["b", "a"][..], None),
            (&["b", "a"][..], Some("ns=docker.io")),
            (&["a", "b"][..], Some("n=2")),
            (&["c", "b"][..], Some("n=2&last=a")),
        ] {
            assert_eq!(page_tags(&tag_list(tags), query), None, "{query:?}");
        }
        assert_eq!(page_tags(b"not json", Some("n=1")), None);
        assert_eq!(page_tags(br#"{"name":"app"}"#, Some("n=1")), None);
    }

    #[test]
    fn link_queries_are_kept_as_they_are() {
        let q = link_query(r#"</v2/library/alpine/tags/list?last=b&n=2>; rel="next""#);
        assert_eq!(q, Some("last=b&n=2"));
        let q = link_query(r#"<https://r.example/v2/a/tags/list?last=a%2Bb>; rel="next""#);
        assert_eq!(q, Some("last=a%2Bb"));
        assert_eq!(link_query("</v2/a/tags/list>"), Some(""));
        assert_eq!(link_query("garbage"), None);
        assert_eq!(
            next_link("/v2/a/tags/list?n=1&ns=b.test"),
            r#"</v2/a/tags/list?n=1&ns=b.test>; rel="next""#
        );
    }

    #[test]
    fn tag_lists_are_renamed_in_their_name_alone() {
        // Go's encoding/json, spacing, other fields and a tag called "name":
        // only the name's value changes.
        let body = br#"{"name":"org/tool","tags":["name","v1"]}"#;
        assert_eq!(
            rename_tag_list(body, "ghcr.io/org/tool").unwrap(),
            br#"{"name":"ghcr.io/org/tool","tags":["name","v1"]}"#[..]
        );
        let body = br#"{ "tags" : ["a"], "extra": {"name": "x", "l": ["name", "y"]},
  "n\u0061me" : "library/alpine" , "z": 1 }"#;
        assert_eq!(
            rename_tag_list(body, "alpine").unwrap(),
            br#"{ "tags" : ["a"], "extra": {"name": "x", "l": ["name", "y"]},
  "n\u0061me" : "alpine" , "z": 1 }"#[..]
        );
        let body = br#"{"name":"a\"b","tags":null}"#;
        assert_eq!(
            rename_tag_list(body, "a").unwrap(),
            br#"{"name":"a","tags":null}"#[..]
        );
        for untouched in [
            &br#"{"name":"same","tags":[]}"#[..],
            br#"{"name":1,"tags":[]}"#,
            br#"{"tags":[]}"#,
            br#"["name","x"]"#,
            b"not json",
        ] {
            assert_eq!(rename_tag_list(untouched, "same"), None);
        }
    }
}
