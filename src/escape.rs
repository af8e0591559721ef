//! Text made safe to print: an escape sequence in a document must not rewrite the user's
//! terminal, and a password in an endpoint URL must not reach a log.

use std::borrow::Cow;

/// `text` with every control character but line breaks and tabs written as `\u{..}`.
pub fn escape_control(text: &str) -> Cow<'_, str> {
    if !text.chars().any(is_unsafe) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if is_unsafe(c) {
            out.push_str(&c.escape_unicode().to_string());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

fn is_unsafe(c: char) -> bool {
    c.is_control() && c != '\n' && c != '\t'
}

/// `url` with any user name and password replaced by `***`, for logs, errors and stored rows.
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if !parsed.username().is_empty() || parsed.password().is_some() => {
            let _ = parsed.set_username("***");
            let _ = parsed.set_password(None);
            parsed.to_string().trim_end_matches('/').to_string()
        }
        _ => url.to_string(),
    }
}

/// `text` with the query of every URL in it hidden: a SAS token travels there, and some
/// of object_store's errors (Azure's batch delete) print the URL whole.
pub fn hide_url_queries(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_query = false;
    let mut in_url = false;
    for (i, c) in text.char_indices() {
        if c.is_whitespace() {
            in_url = false;
            in_query = false;
        } else if text[i..].starts_with("http://") || text[i..].starts_with("https://") {
            in_url = true;
        }
        if in_url && c == '?' && !in_query {
            in_query = true;
            out.push_str("?<hidden>");
        }
        if !in_query {
            out.push(c);
        }
    }
    out
}
