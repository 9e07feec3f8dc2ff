//! Reading rules back from `nft -a list ruleset` text: where each rule sits (family, table,
//! chain), its handle, its comment and its statement text exactly as nft prints it (so it can
//! be loaded again with `nft -f`: the listing round-trips, DESIGN §10). Pure parser.

/// One rule of a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedRule {
    /// nft family keyword.
    pub family: String,
    /// Table name.
    pub table: String,
    /// Chain name.
    pub chain: String,
    /// Rule handle.
    pub handle: u64,
    /// The statement text without the `# handle N` suffix.
    pub text: String,
    /// The rule's comment (`comment "…"`), if it has one.
    pub comment: Option<String>,
}

/// Every rule of an `nft -a list ruleset` (or `list table`) text, in listing order. Lines of
/// set, map and other object blocks are skipped; so are base-chain declarations.
pub fn rules(listing: &str) -> Vec<ListedRule> {
    let mut out = Vec::new();
    let mut table: Option<(String, String)> = None;
    let mut chain: Option<String> = None;
    // Depth inside the table: 0 = table level, 1 = inside a chain or object block.
    let mut depth = 0usize;
    for raw in listing.lines() {
        let line = raw.trim();
        if line.is_empty() {
            continue;
        }
        if table.is_none() {
            if let Some(rest) = line.strip_prefix("table ") {
                let mut w = rest.split_whitespace();
                if let (Some(f), Some(n)) = (w.next(), w.next()) {
                    table = Some((f.to_string(), n.to_string()));
                    depth = 0;
                }
            }
            continue;
        }
        if line == "}" {
            if depth == 0 {
                table = None;
            } else {
                depth -= 1;
                if depth == 0 {
                    chain = None;
                }
            }
            continue;
        }
        if depth == 0 {
            if line.ends_with('{') || line.contains("{ # handle") {
                depth = 1;
                chain = line.strip_prefix("chain ").and_then(|r| r.split_whitespace().next()).map(str::to_string);
            }
            continue;
        }
        // Inside a block: nested braces of multi-line elements.
        if chain.is_none() {
            depth += line.matches('{').count();
            depth = depth.saturating_sub(line.matches('}').count());
            continue;
        }
        let Some((text, handle)) = split_handle(line) else { continue };
        let (Some((family, tname)), Some(c)) = (&table, &chain) else { continue };
        out.push(ListedRule {
            family: family.clone(),
            table: tname.clone(),
            chain: c.clone(),
            handle,
            comment: comment_of(&text),
            text,
        });
    }
    out
}

/// Splits `STATEMENTS # handle N`.
fn split_handle(line: &str) -> Option<(String, u64)> {
    let idx = line.rfind(" # handle ")?;
    let handle = line[idx + " # handle ".len()..].trim().parse().ok()?;
    Some((line[..idx].trim_end().to_string(), handle))
}

/// The text of the last `comment "…"` of a rule (ctguard's tags need no escaping).
pub fn comment_of(text: &str) -> Option<String> {
    let idx = text.rfind("comment \"")?;
    let rest = &text[idx + "comment \"".len()..];
    let end = rest.find('"')?;
    Some(rest[..end].to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LISTING: &str = "table inet host { # handle 5
	set blocklist { # handle 3
		type ipv4_addr
		flags interval
		elements = { 192.0.2.0/24,
			     198.51.100.0/24 }
	}

	chain input { # handle 1
		type filter hook input priority filter; policy drop;
		ct state established,related accept # handle 4
		ip saddr @blocklist drop # handle 6
		udp dport 53 ct state untracked accept comment \"ctguard:a-1\" # handle 9
		udp dport 53 ct state new accept # handle 7
	}
}
table ip other { # handle 6
	chain c { # handle 1
		type filter hook output priority filter; policy accept;
		counter packets 0 bytes 0 # handle 2
	}
}
";

    #[test]
    fn finds_rules_with_place_handle_and_comment() {
        let r = rules(LISTING);
        assert_eq!(r.len(), 5, "{r:#?}");
        assert_eq!(
            (r[0].family.as_str(), r[0].table.as_str(), r[0].chain.as_str(), r[0].handle),
            ("inet", "host", "input", 4)
        );
        assert_eq!(r[2].comment.as_deref(), Some("ctguard:a-1"));
        assert_eq!(r[2].text, "udp dport 53 ct state untracked accept comment \"ctguard:a-1\"");
        assert_eq!((r[4].family.as_str(), r[4].chain.as_str(), r[4].handle), ("ip", "c", 2));
        assert!(r.iter().all(|x| !x.text.contains("elements")));
    }
}
