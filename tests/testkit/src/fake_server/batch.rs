//! The fake server's OpenAI Batch API: files, batches that end after a few polls, and the
//! failures a test asks for.

use super::*;

/// The fake Batch API's routes; `None` for any other request.
pub(super) fn batch_api(
    state: &FakeState,
    method: &str,
    path: &str,
    body: &[u8],
) -> Option<(&'static str, String)> {
    let mut api = state.batch.lock().unwrap();
    let new_id = |prefix: &str, n: usize| format!("{prefix}-{n}");
    if method == "POST" && path == "/v1/files" {
        let text = String::from_utf8_lossy(body);
        let start = text.find("filename=")?;
        let content_start = start + text[start..].find("\r\n\r\n")? + 4;
        let content_end = content_start + text[content_start..].rfind("\r\n--")?;
        let id = new_id("file", api.files.len());
        api.files
            .insert(id.clone(), text[content_start..content_end].to_string());
        return Some((
            "200 OK",
            json!({"id": id, "object": "file", "purpose": "batch"}).to_string(),
        ));
    }
    if method == "POST" && path == "/v1/batches" {
        let req: Value = serde_json::from_slice(body).ok()?;
        let file = req["input_file_id"].as_str()?.to_string();
        let lines = api.files.get(&file).map_or(0, |f| f.lines().count());
        api.batch_sizes.push(lines);
        let id = new_id("batch", api.created.len());
        api.batches.insert(id.clone(), (file.clone(), 1));
        api.created
            .push((id.clone(), file, req["metadata"].clone()));
        if std::mem::take(&mut api.lose_next_create_reply) {
            return Some(("500 Internal Server Error", "{}".to_string()));
        }
        return Some((
            "200 OK",
            json!({"id": id, "status": "validating"}).to_string(),
        ));
    }
    if method == "GET" && (path == "/v1/batches" || path.starts_with("/v1/batches?")) {
        let data: Vec<Value> = api
            .created
            .iter()
            .rev()
            .map(|(id, file, metadata)| {
                let status = if api.batches.contains_key(id) {
                    "in_progress"
                } else {
                    "completed"
                };
                json!({"id": id, "status": status, "input_file_id": file, "metadata": metadata})
            })
            .collect();
        return Some((
            "200 OK",
            json!({"object": "list", "data": data, "has_more": false}).to_string(),
        ));
    }
    if method == "GET" && path.starts_with("/v1/batches/") {
        let id = path.trim_start_matches("/v1/batches/").to_string();
        let (file, polls) = api.batches.get(&id)?.clone();
        if let Some(status) = &api.status_override {
            return Some(("200 OK", json!({"id": id, "status": status}).to_string()));
        }
        if polls > 0 {
            api.batches.insert(id.clone(), (file, polls - 1));
            return Some((
                "200 OK",
                json!({"id": id, "status": "in_progress"}).to_string(),
            ));
        }
        let lines: Vec<Value> = api.files[&file]
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        let expire = std::mem::take(&mut api.expire_next);
        let answered = if expire { lines.len() / 2 } else { lines.len() };
        let (mut output, mut errors) = (String::new(), String::new());
        for line in &lines[..answered] {
            let custom_id = line["custom_id"].as_str().unwrap_or_default().to_string();
            let prompt = prompt_of(&line["body"]);
            let fails = api
                .fail_once
                .as_ref()
                .is_some_and(|m| prompt.contains(m.as_str()))
                && api.failed.insert(custom_id.clone());
            if fails {
                errors.push_str(&json!({"custom_id": custom_id, "response": {"status_code": 500, "body": {}}, "error": {"message": "injected"}}).to_string());
                errors.push('\n');
                continue;
            }
            let answer = answer_for(&prompt);
            let mut body = chat_json(prompt.len(), &answer);
            body["model"] = line["body"]["model"].clone();
            output.push_str(&json!({"id": "r", "custom_id": custom_id, "response": {"status_code": 200, "body": body}, "error": null}).to_string());
            output.push('\n');
        }
        let out_id = new_id("file", api.files.len());
        api.files.insert(out_id.clone(), output);
        let err_id = new_id("file", api.files.len());
        api.files.insert(err_id.clone(), errors);
        api.batches.remove(&id);
        let status = if expire { "expired" } else { "completed" };
        return Some((
            "200 OK",
            json!({"id": id, "status": status, "output_file_id": out_id, "error_file_id": err_id})
                .to_string(),
        ));
    }
    if method == "GET" && path.starts_with("/v1/files/") && path.ends_with("/content") {
        let id = path
            .trim_start_matches("/v1/files/")
            .trim_end_matches("/content");
        return Some(("200 OK", api.files.get(id)?.clone()));
    }
    None
}

