//! Mutating API calls as the apiserver counts them: `apiserver_request_total` from `/metrics`,
//! summed by verb and resource, and the difference of two scrapes.

use std::collections::BTreeMap;

use kube::Client;

/// Verbs that change state; the apiserver counts a server-side apply PATCH as `APPLY`.
const MUTATING: [&str; 5] = ["POST", "PUT", "PATCH", "APPLY", "DELETE"];
/// Resources a desktop's life touches (deskvirt.io ones are matched by group).
const CORE: [&str; 3] = ["secrets", "leases", "events"];

/// `(verb, resource[/subresource])` → count.
pub type Counts = BTreeMap<(String, String), f64>;

/// Scrapes `/metrics` and keeps the mutating calls on deskvirt.io resources, Secrets, Leases
/// and Events.
pub async fn scrape(client: &Client) -> anyhow::Result<Counts> {
    let req = http::Request::get("/metrics").body(Vec::new())?;
    let text = client.request_text(req).await?;
    Ok(parse(&text))
}

/// Parses Prometheus text format lines of `apiserver_request_total`.
pub fn parse(text: &str) -> Counts {
    let mut out = Counts::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("apiserver_request_total{") else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once('}') else {
            continue;
        };
        let Ok(value) = value.trim().parse::<f64>() else {
            continue;
        };
        let label = |name: &str| -> String {
            let key = format!("{name}=\"");
            labels
                .split(',')
                .find_map(|kv| kv.strip_prefix(&key))
                .map(|v| v.trim_end_matches('"').to_string())
                .unwrap_or_default()
        };
        let verb = label("verb");
        if !MUTATING.contains(&verb.as_str()) {
            continue;
        }
        let (group, resource) = (label("group"), label("resource"));
        if group != "deskvirt.io" && !CORE.contains(&resource.as_str()) {
            continue;
        }
        let sub = label("subresource");
        let what = if sub.is_empty() {
            resource
        } else {
            format!("{resource}/{sub}")
        };
        *out.entry((verb, what)).or_default() += value;
    }
    out
}

/// `after - before`, dropping zero rows.
pub fn delta(before: &Counts, after: &Counts) -> Counts {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0.0)))
        .filter(|(_, v)| v.abs() > 0.0)
        .collect()
}

/// Sum of all rows.
pub fn total(c: &Counts) -> f64 {
    c.values().sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_mutating_calls_on_our_resources() {
        let text = r#"
apiserver_request_total{code="201",component="apiserver",contentType="application/json",dry_run="",group="deskvirt.io",resource="desktops",scope="resource",subresource="",verb="POST",version="v1alpha1"} 3
apiserver_request_total{code="200",component="apiserver",contentType="application/json",dry_run="",group="deskvirt.io",resource="desktops",scope="resource",subresource="status",verb="PATCH",version="v1alpha1"} 5
apiserver_request_total{code="200",component="apiserver",contentType="application/json",dry_run="",group="deskvirt.io",resource="desktops",scope="resource",subresource="status",verb="PATCH",version="v1alpha1"} 1
apiserver_request_total{code="200",component="apiserver",contentType="application/json",dry_run="",group="deskvirt.io",resource="desktops",scope="resource",subresource="status",verb="APPLY",version="v1alpha1"} 2
apiserver_request_total{code="200",component="apiserver",contentType="application/json",dry_run="",group="",resource="pods",scope="resource",subresource="",verb="POST",version="v1"} 9
apiserver_request_total{code="200",component="apiserver",contentType="application/json",dry_run="",group="deskvirt.io",resource="desktops",scope="resource",subresource="",verb="GET",version="v1alpha1"} 9
"#;
        let c = parse(text);
        assert_eq!(total(&c), 11.0);
        assert_eq!(
            c.get(&("PATCH".into(), "desktops/status".into())),
            Some(&6.0)
        );
        let d = delta(&Counts::new(), &c);
        assert_eq!(d.len(), 3);
    }
}
