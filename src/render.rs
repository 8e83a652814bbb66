//! The Minimal renderer: what a voice device makes of an agent's text and UI components.
//!
//! - Streamed text is cut into sentences as it arrives, so the first sentence can be spoken before
//!   the reply is complete. A sentence ends at `.`, `!`, `?` or `…` followed by white space (not after
//!   an abbreviation such as "Dr." or "e.g.", an initial such as "J.", or a list number), or at a line
//!   break.
//! - Markdown, HTML tags and entities and control characters are stripped before speaking; a fenced
//!   code block is summarised ("A python code block of 12 lines, not read aloud."); a reply longer
//!   than `max_spoken_chars` is cut at a sentence with a spoken notice.
//! - Components a voice device cannot show become speech by a fallback chain: the component's own
//!   `fallback` first (the spec's precomputed one), then the catalogue chain (`chart -> table ->
//!   text`, `diff -> code-block -> text`, `tabs`/`split` -> `group` -> children in order), then the
//!   type's spoken form. A table is read as its title, its row count and its first `table_rows` rows;
//!   `confirm` and `choices` are read as a question, and the user's next spoken answer is turned into
//!   the matching input ([`Renderer::answer`]).
//!
//! Pure and synchronous: no I/O, no clock, no tokio. Context: whatever task drives it.

use serde_json::{Map, Value};

use crate::protocol::Downlink;

/// Said once when a reply is cut at `max_spoken_chars`.
pub const CAP_NOTICE: &str = "The rest of this answer is too long to read aloud.";

/// Text this long with no sentence end yet is spoken up to its last space anyway: a run-on answer
/// must not wait (or grow) without bound.
const MAX_SENTENCE_CHARS: usize = 300;

/// Deepest `group` nesting read (the spec says deeper nesting must be rejected).
const MAX_GROUP_DEPTH: usize = 3;

/// Abbreviations after which a full stop does not end a sentence (lower case, without the stop).
const ABBREVIATIONS: &[&str] = &[
    "mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "vs", "etc", "e.g", "i.e", "approx", "no",
    "fig", "inc", "ltd", "co", "mt", "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep",
    "sept", "oct", "nov", "dec", "a.m", "p.m", "u.s", "cf", "al",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RenderSettings {
    /// Characters of one reply spoken at most; beyond it the reply is cut with [`CAP_NOTICE`].
    pub max_spoken_chars: usize,
    /// Rows of a table read aloud before "and N more rows".
    pub table_rows: usize,
}

impl Default for RenderSettings {
    fn default() -> Self {
        RenderSettings {
            max_spoken_chars: 1500,
            table_rows: 5,
        }
    }
}

/// A question the device asked (from `confirm` or `choices`), waiting for the user's spoken answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Question {
    Confirm {
        component: Option<String>,
        confirm_label: String,
        deny_label: String,
    },
    Choices {
        component: Option<String>,
        /// (label, value)
        options: Vec<(String, String)>,
    },
}

/// What the user's answer to a [`Question`] became.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// The text to send as the user's input.
    pub text: String,
    /// The component answered, when the answer matched the question.
    pub component: Option<String>,
}

/// Per-reply state: text not yet cut, code fences, the cap, the components shown so far.
#[derive(Debug, Default)]
pub struct Renderer {
    settings: RenderSettings,
    /// Raw text of the current line not yet classified (it may open a code fence).
    line: String,
    /// The current line was already classified as prose.
    line_is_prose: bool,
    /// Prose not yet cut into sentences.
    prose: String,
    /// Inside a fenced code block: its language and the lines seen.
    code: Option<(String, usize)>,
    spoken_chars: usize,
    capped: bool,
    question: Option<Question>,
    /// Components of this reply by id, for `patch`.
    components: Vec<Value>,
}

impl Renderer {
    pub fn new(settings: RenderSettings) -> Self {
        Renderer {
            settings,
            ..Renderer::default()
        }
    }

    /// Forget the current reply (a new answer starts, or the user barged in). A pending question is
    /// kept: the user's next turn may be its answer.
    pub fn reset(&mut self) {
        let question = self.question.take();
        *self = Renderer::new(self.settings);
        self.question = question;
    }

    /// The reply was cut at `max_spoken_chars`.
    pub fn capped(&self) -> bool {
        self.capped
    }

    pub fn question(&self) -> Option<&Question> {
        self.question.as_ref()
    }

    /// What one agent event adds to the speech, in order: text deltas give the sentences they
    /// complete, a component its spoken form, a patch the components it changed, the end of a text or
    /// of the answer whatever text was still pending. Other events say nothing.
    pub fn on_downlink(&mut self, d: &Downlink) -> Vec<String> {
        match d {
            Downlink::TextDelta { text, .. } => self.push_text(text),
            Downlink::TextDone { .. } | Downlink::ResponseFinished { .. } => self.finish(),
            Downlink::Render { component, .. } => self.component(component),
            Downlink::Patch { ops } => {
                let (said, skipped) = self.patch(ops);
                for reason in skipped {
                    tracing::debug!(%reason, "patch operation skipped");
                }
                said
            }
            _ => Vec::new(),
        }
    }

    /// Add streamed text; returns the sentences now complete, cleaned and ready to speak.
    pub fn push_text(&mut self, delta: &str) -> Vec<String> {
        let mut out = Vec::new();
        for ch in delta.chars() {
            if ch == '\n' {
                let line = std::mem::take(&mut self.line);
                let was_prose = std::mem::replace(&mut self.line_is_prose, false);
                self.end_line(&line, was_prose, &mut out);
                continue;
            }
            self.line.push(ch);
            if !self.line_is_prose && self.code.is_none() && !could_open_fence(&self.line) {
                // Not a fence: the line is prose, and sentences may complete before its end.
                self.line_is_prose = true;
            }
            if self.line_is_prose {
                let line = std::mem::take(&mut self.line);
                self.prose.push_str(&line);
                self.cut(false, &mut out);
            }
        }
        out
    }

    /// The reply's text is complete: everything not spoken yet.
    pub fn finish(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        if !self.line.is_empty() || self.line_is_prose {
            let line = std::mem::take(&mut self.line);
            let was_prose = std::mem::replace(&mut self.line_is_prose, false);
            self.end_line(&line, was_prose, &mut out);
        }
        if let Some((lang, lines)) = self.code.take() {
            // An unterminated fence: summarise what came.
            let s = code_summary(None, &lang, lines);
            self.say(s, &mut out);
        }
        self.cut(true, &mut out);
        out
    }

    fn end_line(&mut self, line: &str, was_prose: bool, out: &mut Vec<String>) {
        let fence = line.trim_start().starts_with("```") || line.trim_start().starts_with("~~~");
        if let Some((lang, lines)) = &mut self.code {
            if fence && !was_prose {
                let s = code_summary(None, lang, *lines);
                self.code = None;
                self.say(s, out);
            } else {
                *lines += 1;
            }
            return;
        }
        if fence && !was_prose {
            self.cut(true, out);
            let lang = line.trim_start().trim_start_matches(['`', '~']).trim();
            self.code = Some((lang.split_whitespace().next().unwrap_or("").into(), 0));
            return;
        }
        self.prose.push_str(line);
        // A line break ends a sentence (list items, headings and paragraphs rarely end with a stop).
        self.prose.push('\n');
        self.cut(false, out);
    }

    /// Cut complete sentences off `prose`; with `all`, the rest too.
    fn cut(&mut self, all: bool, out: &mut Vec<String>) {
        while let Some(end) = sentence_end(&self.prose) {
            let rest = self.prose.split_off(end);
            let s = std::mem::replace(&mut self.prose, rest);
            self.speak_markdown(&s, out);
        }
        while self.prose.len() > MAX_SENTENCE_CHARS {
            let mut at = MAX_SENTENCE_CHARS;
            while !self.prose.is_char_boundary(at) {
                at -= 1;
            }
            let cut = self.prose[..at]
                .rfind(char::is_whitespace)
                .map_or(at, |i| i + 1);
            let rest = self.prose.split_off(cut);
            let s = std::mem::replace(&mut self.prose, rest);
            self.speak_markdown(&s, out);
        }
        if all && !self.prose.is_empty() {
            let s = std::mem::take(&mut self.prose);
            self.speak_markdown(&s, out);
        }
    }

    fn speak_markdown(&mut self, raw: &str, out: &mut Vec<String>) {
        let s = clean_markdown(raw);
        self.say(s, out);
    }

    /// Apply the cap and queue one spoken sentence.
    fn say(&mut self, s: String, out: &mut Vec<String>) {
        if s.is_empty() || self.capped {
            return;
        }
        let n = s.chars().count();
        if self.spoken_chars + n > self.settings.max_spoken_chars {
            self.capped = true;
            if self.spoken_chars == 0 {
                // One sentence longer than the whole budget: its start, to the last word that fits.
                let budget: String = s.chars().take(self.settings.max_spoken_chars).collect();
                let head = budget
                    .rfind(char::is_whitespace)
                    .map_or(budget.as_str(), |i| &budget[..i]);
                out.push(head.trim_end().to_string());
            }
            out.push(CAP_NOTICE.to_string());
            return;
        }
        self.spoken_chars += n;
        out.push(s);
    }

    /// A component to show: its spoken form (text still pending is spoken first, in order).
    pub fn component(&mut self, c: &Value) -> Vec<String> {
        let mut out = Vec::new();
        self.cut(true, &mut out);
        let mut question = None;
        let text = speak_component(c, &self.settings, 0, &mut question);
        if question.is_some() {
            self.question = question;
        }
        if c.get("id").and_then(Value::as_str).is_some() {
            let id = c.get("id").cloned();
            self.components.retain(|x| x.get("id") != id.as_ref());
            self.components.push(c.clone());
        }
        for s in split_spoken(&text) {
            self.say(s, &mut out);
        }
        out
    }

    /// Patch operations (`update`, `insert`, `remove`, `replace`, `reorder`) on this reply's
    /// components. A component that changed (or appeared) is spoken again; `remove` and `reorder`
    /// change nothing a listener could hear. Unknown ops and missing targets are skipped with a reason.
    pub fn patch(&mut self, ops: &[Value]) -> (Vec<String>, Vec<String>) {
        let mut changed: Vec<Value> = Vec::new();
        let mut skipped = Vec::new();
        for op in ops {
            let kind = op.get("op").and_then(Value::as_str).unwrap_or("");
            let target = op.get("target").and_then(Value::as_str);
            let find = |cs: &Vec<Value>, id: Option<&str>| {
                id.and_then(|id| {
                    cs.iter()
                        .position(|c| c.get("id").and_then(Value::as_str) == Some(id))
                })
            };
            match kind {
                "update" => {
                    let (Some(i), Some(path)) = (
                        find(&self.components, target),
                        op.get("path").and_then(Value::as_str),
                    ) else {
                        skipped.push(format!("update: no component {target:?} or no path"));
                        continue;
                    };
                    let value = op.get("value").cloned().unwrap_or(Value::Null);
                    if set_path(&mut self.components[i], path, value) {
                        changed.push(self.components[i].clone());
                    } else {
                        skipped.push(format!("update: bad path {path:?}"));
                    }
                }
                "replace" => match (find(&self.components, target), op.get("component")) {
                    (Some(i), Some(c)) => {
                        self.components[i] = c.clone();
                        changed.push(c.clone());
                    }
                    _ => skipped.push(format!("replace: no component {target:?}")),
                },
                "insert" => match op.get("component") {
                    Some(c) => {
                        let after = op.get("after").and_then(Value::as_str);
                        let at = match find(&self.components, after) {
                            Some(i) => i + 1,
                            None => 0,
                        };
                        self.components.insert(at, c.clone());
                        changed.push(c.clone());
                    }
                    None => skipped.push("insert: no component".into()),
                },
                "remove" => match find(&self.components, target) {
                    Some(i) => {
                        self.components.remove(i);
                    }
                    None => skipped.push(format!("remove: no component {target:?}")),
                },
                "reorder" => match find(&self.components, target) {
                    Some(i) => {
                        let c = self.components.remove(i);
                        let at = find(&self.components, op.get("after").and_then(Value::as_str))
                            .map_or(0, |j| j + 1);
                        self.components.insert(at, c);
                    }
                    None => skipped.push(format!("reorder: no component {target:?}")),
                },
                other => skipped.push(format!("unknown patch op {other:?}")),
            }
        }
        let mut out = Vec::new();
        for c in changed {
            let mut question = None;
            let text = speak_component(&c, &self.settings, 0, &mut question);
            if question.is_some() {
                self.question = question;
            }
            for s in split_spoken(&text) {
                self.say(s, &mut out);
            }
        }
        (out, skipped)
    }

    /// The user's spoken answer. With a question pending, an answer that matches it becomes the
    /// input the agent expects (`[Confirmed] <label>`, `[Denied] <label>`, or the chosen option's
    /// label, as the reference renderer sends); anything else goes as said. The question is settled
    /// either way.
    pub fn answer(&mut self, transcript: &str) -> Answer {
        let said = transcript.trim().to_string();
        let Some(q) = self.question.take() else {
            return Answer {
                text: said,
                component: None,
            };
        };
        let words = normalise_words(&said);
        match q {
            Question::Confirm {
                component,
                confirm_label,
                deny_label,
            } => {
                let yes = ["yes", "yeah", "yep", "sure", "ok", "okay", "confirm", "go"];
                let no = [
                    "no", "nope", "cancel", "deny", "don't", "dont", "stop", "not",
                ];
                let label_words = |l: &str| normalise_words(l);
                // The labels first ("keep it", "delete"), then the first yes- or no-word said:
                // "yes, no problem" is a yes.
                let (is_yes, is_no) = if contains_seq(&words, &label_words(&deny_label)) {
                    (false, true)
                } else if contains_seq(&words, &label_words(&confirm_label)) {
                    (true, false)
                } else {
                    match words.iter().find_map(|w| {
                        if yes.contains(&w.as_str()) {
                            Some(true)
                        } else if no.contains(&w.as_str()) {
                            Some(false)
                        } else {
                            None
                        }
                    }) {
                        Some(true) => (true, false),
                        Some(false) => (false, true),
                        None => (false, false),
                    }
                };
                if is_no {
                    Answer {
                        text: format!("[Denied] {deny_label}"),
                        component,
                    }
                } else if is_yes {
                    Answer {
                        text: format!("[Confirmed] {confirm_label}"),
                        component,
                    }
                } else {
                    Answer {
                        text: said,
                        component: None,
                    }
                }
            }
            Question::Choices { component, options } => {
                // By position ("two", "the second one", "number 2") or by the option's words.
                let ordinals = [
                    ["1", "one", "first"],
                    ["2", "two", "second"],
                    ["3", "three", "third"],
                    ["4", "four", "fourth"],
                    ["5", "five", "fifth"],
                    ["6", "six", "sixth"],
                    ["7", "seven", "seventh"],
                    ["8", "eight", "eighth"],
                    ["9", "nine", "ninth"],
                ];
                let by_label = options.iter().find(|(label, _)| {
                    let lw = normalise_words(label);
                    !lw.is_empty() && contains_seq(&words, &lw)
                });
                // Highest ordinal first: in "the second one", "one" is not the choice.
                let by_pos = || {
                    ordinals.iter().enumerate().rev().find_map(|(i, names)| {
                        (i < options.len() && words.iter().any(|w| names.contains(&w.as_str())))
                            .then(|| &options[i])
                    })
                };
                match by_label.or_else(by_pos) {
                    Some((label, _)) => Answer {
                        text: label.clone(),
                        component,
                    },
                    None => Answer {
                        text: said,
                        component: None,
                    },
                }
            }
        }
    }
}

/// A line that is (so far) only indentation and backticks or tildes could still open a fence.
fn could_open_fence(line: &str) -> bool {
    let t = line.trim_start();
    if t.is_empty() {
        return true;
    }
    let fence = t.starts_with("```") || t.starts_with("~~~");
    fence || t.chars().all(|c| c == '`') || t.chars().all(|c| c == '~')
}

fn code_summary(title: Option<&str>, lang: &str, lines: usize) -> String {
    let what = if lang.is_empty() {
        "A code block".to_string()
    } else {
        format!("A {lang} code block")
    };
    let lines = if lines == 1 {
        "1 line".to_string()
    } else {
        format!("{lines} lines")
    };
    match title {
        Some(t) if !t.is_empty() => {
            format!("{}. {what} of {lines}, not read aloud.", clean_inline(t))
        }
        _ => format!("{what} of {lines}, not read aloud."),
    }
}

/// Byte index just past the first complete sentence of `s` (including the white space after it).
fn sentence_end(s: &str) -> Option<usize> {
    let chars: Vec<(usize, char)> = s.char_indices().collect();
    for (k, &(i, c)) in chars.iter().enumerate() {
        if c == '\n' {
            return Some(i + 1);
        }
        if !matches!(c, '.' | '!' | '?' | '…' | '。') {
            continue;
        }
        // Terminators run together ("?!", "..."), closing quotes and brackets belong to the sentence.
        let mut j = k + 1;
        while j < chars.len()
            && matches!(
                chars[j].1,
                '.' | '!' | '?' | '…' | '"' | '\'' | ')' | '”' | '’'
            )
        {
            j += 1;
        }
        // Decide only once the next character is known: "3.5" and "example.com" are not ends.
        let &(next_i, next) = chars.get(j)?;
        if !next.is_whitespace() {
            continue;
        }
        if c == '.' && j == k + 1 && !ends_sentence_at_stop(&s[..i]) {
            continue;
        }
        return Some(next_i + next.len_utf8());
    }
    None
}

/// The word before a single full stop: is the stop a sentence end?
fn ends_sentence_at_stop(before: &str) -> bool {
    let word: String = before
        .chars()
        .rev()
        .take_while(|c| !c.is_whitespace() && *c != '(' && *c != '"')
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    let w = word.trim_start_matches(['*', '_', '`']).to_lowercase();
    if w.is_empty() {
        return true;
    }
    if ABBREVIATIONS.contains(&w.as_str()) {
        return false;
    }
    // A single capital letter: an initial ("J. R. R. Tolkien").
    let mut cs = word.chars();
    if let (Some(c), None) = (cs.next(), cs.next())
        && c.is_uppercase()
    {
        return false;
    }
    // A list number at the start of a line ("1. First").
    let line_start = before[..before.len() - word.len()].trim_end_matches([' ', '\t']);
    if (line_start.is_empty() || line_start.ends_with('\n'))
        && w.chars().all(|c| c.is_ascii_digit())
    {
        return false;
    }
    true
}

/// Markdown (one sentence or block) to plain speakable text.
pub fn clean_markdown(raw: &str) -> String {
    let mut out = String::new();
    for line in raw.lines() {
        let mut t = line.trim();
        // Table separator rows say nothing.
        if t.starts_with('|') && t.chars().all(|c| matches!(c, '|' | '-' | ':' | ' ')) {
            continue;
        }
        if t.chars().all(|c| matches!(c, '-' | '*' | '_' | '=' | ' ')) && t.len() >= 3 {
            continue; // a rule
        }
        t = t.trim_start_matches('#').trim_start();
        t = t.trim_start_matches('>').trim_start();
        for marker in ["- [ ] ", "- [x] ", "- ", "* ", "+ ", "• "] {
            if let Some(rest) = t.strip_prefix(marker) {
                t = rest;
                break;
            }
        }
        // "1. " / "2) " list numbers.
        let digits = t.chars().take_while(|c| c.is_ascii_digit()).count();
        if digits > 0 && digits <= 3 {
            let rest = &t[digits..];
            if let Some(r) = rest.strip_prefix(". ").or_else(|| rest.strip_prefix(") ")) {
                t = r;
            }
        }
        let line = if t.starts_with('|') {
            // A markdown table row: its cells, comma separated.
            t.trim_matches('|')
                .split('|')
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .collect::<Vec<_>>()
                .join(", ")
        } else {
            t.to_string()
        };
        let c = clean_inline(&line);
        if !c.is_empty() {
            if !out.is_empty() {
                out.push(' ');
            }
            out.push_str(&c);
        }
    }
    out
}

/// Inline markup to plain text: links and images keep their text, emphasis and code marks go, HTML
/// tags go, entities are decoded, control characters and runs of white space collapse.
pub fn clean_inline(s: &str) -> String {
    let s = strip_links(s);
    let s = strip_tags(&s);
    let s = decode_entities(&s);
    let mut out = String::with_capacity(s.len());
    let mut prev_space = true;
    let chars: Vec<char> = s.chars().collect();
    for (i, &c) in chars.iter().enumerate() {
        let c = if c.is_control() || c == '\u{200b}' {
            ' '
        } else {
            c
        };
        match c {
            '*' | '`' | '~' => continue,
            // `_` marks emphasis at word edges; inside a word (snake_case) it is read as a space.
            '_' => {
                let inner = i > 0
                    && i + 1 < chars.len()
                    && chars[i - 1].is_alphanumeric()
                    && chars[i + 1].is_alphanumeric();
                if inner && !prev_space {
                    out.push(' ');
                    prev_space = true;
                }
                continue;
            }
            c if c.is_whitespace() => {
                if !prev_space {
                    out.push(' ');
                    prev_space = true;
                }
            }
            c => {
                out.push(c);
                prev_space = false;
            }
        }
    }
    let out = out.trim().to_string();
    // Bare URLs are not worth reading out.
    out.split(' ')
        .map(|w| {
            if w.starts_with("http://") || w.starts_with("https://") {
                "a link"
            } else {
                w
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// `[text](url)` -> text, `![alt](url)` -> alt.
fn strip_links(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(open) = rest.find('[') {
        let (before, from) = rest.split_at(open);
        let before = before.strip_suffix('!').unwrap_or(before);
        out.push_str(before);
        match from.find("](") {
            Some(mid) if !from[1..mid].contains('[') => {
                let after = &from[mid + 2..];
                match after.find(')') {
                    Some(close) => {
                        out.push_str(&from[1..mid]);
                        rest = &after[close + 1..];
                    }
                    None => {
                        out.push_str(&from[1..mid]);
                        rest = "";
                    }
                }
            }
            _ => {
                out.push('[');
                rest = &from[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

fn strip_tags(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(open) = rest.find('<') {
        out.push_str(&rest[..open]);
        let tail = &rest[open..];
        let looks_like_tag = tail[1..]
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '/' || c == '!');
        match (looks_like_tag, tail.find('>')) {
            (true, Some(close)) => {
                let tag = tail[1..close].trim_start_matches('/').to_lowercase();
                // Block-level tags separate words.
                if ["br", "p", "div", "li", "tr", "td", "h1", "h2", "h3"]
                    .iter()
                    .any(|t| tag.starts_with(t))
                {
                    out.push(' ');
                }
                rest = &tail[close + 1..];
            }
            _ => {
                out.push('<');
                rest = &tail[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

fn decode_entities(s: &str) -> String {
    if !s.contains('&') {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        let tail = &rest[amp..];
        let semi = tail.find(';').filter(|&i| i <= 10);
        let decoded = semi.and_then(|i| {
            let name = &tail[1..i];
            let c = match name {
                "amp" => Some('&'),
                "lt" => Some('<'),
                "gt" => Some('>'),
                "quot" => Some('"'),
                "apos" | "#39" => Some('\''),
                "nbsp" => Some(' '),
                _ => name
                    .strip_prefix("#x")
                    .and_then(|h| u32::from_str_radix(h, 16).ok())
                    .or_else(|| name.strip_prefix('#').and_then(|d| d.parse().ok()))
                    .and_then(char::from_u32),
            };
            c.map(|c| (c, i))
        });
        match decoded {
            Some((c, i)) => {
                out.push(c);
                rest = &tail[i + 1..];
            }
            None => {
                out.push('&');
                rest = &tail[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// Spoken text of a component, cut into sentences for synthesis.
fn split_spoken(text: &str) -> Vec<String> {
    let mut r = Renderer::new(RenderSettings {
        max_spoken_chars: usize::MAX,
        table_rows: usize::MAX,
    });
    let mut out = r.push_text(text);
    out.extend(r.finish());
    out
}

fn props(c: &Value) -> &Map<String, Value> {
    static EMPTY: std::sync::OnceLock<Map<String, Value>> = std::sync::OnceLock::new();
    c.get("props")
        .and_then(Value::as_object)
        .unwrap_or_else(|| EMPTY.get_or_init(Map::new))
}

fn prop_str<'a>(p: &'a Map<String, Value>, key: &str) -> Option<&'a str> {
    p.get(key)
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|s| !s.is_empty())
}

/// A cell or value as words (numbers and booleans too; nested values are not read).
fn cell(v: &Value) -> String {
    match v {
        Value::String(s) => clean_inline(s),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => if *b { "yes" } else { "no" }.into(),
        Value::Null => String::new(),
        Value::Object(o) => o
            .get("label")
            .or_else(|| o.get("value"))
            .or_else(|| o.get("text"))
            .map(cell)
            .unwrap_or_default(),
        Value::Array(_) => String::new(),
    }
}

fn sentence(s: &str) -> String {
    let s = s.trim();
    if s.is_empty() || s.ends_with(['.', '!', '?', ':']) {
        s.to_string()
    } else {
        format!("{s}.")
    }
}

fn join_sentences(parts: impl IntoIterator<Item = String>) -> String {
    parts
        .into_iter()
        .filter(|p| !p.trim().is_empty())
        .map(|p| sentence(&p))
        .collect::<Vec<_>>()
        .join(" ")
}

fn plural(n: usize, one: &str, many: &str) -> String {
    if n == 1 {
        format!("1 {one}")
    } else {
        format!("{n} {many}")
    }
}

/// The catalogue's fallback for a type: where the chain goes next.
pub fn catalogue_fallback(ty: &str) -> Option<&'static str> {
    match ty {
        "text" => None,
        "chart" => Some("table"),
        "diff" => Some("code-block"),
        "tabs" | "split" => Some("group"),
        _ => Some("text"),
    }
}

/// Spoken form of one component. `question` is set when it asks the user something.
fn speak_component(
    c: &Value,
    settings: &RenderSettings,
    depth: usize,
    question: &mut Option<Question>,
) -> String {
    let ty = c.get("type").and_then(Value::as_str).unwrap_or("");
    // This renderer shows only `text`: any other type with a precomputed fallback uses it.
    if ty != "text"
        && let Some(fb) = c.get("fallback").filter(|f| f.is_object())
    {
        return speak_component(fb, settings, depth, question);
    }
    let p = props(c);
    let id = c.get("id").and_then(Value::as_str).map(str::to_string);
    match ty {
        "text" => prop_str(p, "text")
            .or_else(|| prop_str(p, "content"))
            .map(clean_markdown)
            .unwrap_or_default(),
        "markdown" => {
            let mut r = Renderer::new(RenderSettings {
                max_spoken_chars: usize::MAX,
                ..*settings
            });
            let body = prop_str(p, "content")
                .or_else(|| prop_str(p, "text"))
                .unwrap_or("");
            let mut parts: Vec<String> =
                prop_str(p, "title").map(clean_inline).into_iter().collect();
            parts.extend(r.push_text(body));
            parts.extend(r.finish());
            join_sentences(parts)
        }
        "table" => speak_table(p, settings, false),
        "chart" => speak_table(&chart_to_table(p), settings, true),
        "status-card" => {
            let head = match (prop_str(p, "status"), prop_str(p, "title")) {
                (Some(s), Some(t)) => format!("{}: {}", capitalise(s), clean_inline(t)),
                (None, Some(t)) => clean_inline(t),
                (Some(s), None) => capitalise(s),
                (None, None) => String::new(),
            };
            let mut parts = vec![head];
            parts.extend(prop_str(p, "message").map(clean_inline));
            join_sentences(parts)
        }
        "key-value" => {
            let items: Vec<String> = p
                .get("items")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|it| {
                            let k = it.get("key").map(cell).unwrap_or_default();
                            let v = it.get("value").map(cell).unwrap_or_default();
                            (!k.is_empty() || !v.is_empty()).then(|| format!("{k}: {v}"))
                        })
                        .collect()
                })
                .unwrap_or_default();
            let mut parts: Vec<String> =
                prop_str(p, "title").map(clean_inline).into_iter().collect();
            if !items.is_empty() {
                parts.push(items.join("; "));
            }
            join_sentences(parts)
        }
        "progress" => {
            let steps: Vec<String> = p
                .get("steps")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .map(|s| {
                            let name = s.get("name").map(cell).unwrap_or_default();
                            let status = s.get("status").map(cell).unwrap_or_default();
                            format!("{name} {status}").trim().to_string()
                        })
                        .filter(|s| !s.is_empty())
                        .collect()
                })
                .unwrap_or_default();
            let mut text = prop_str(p, "title").map(clean_inline).unwrap_or_default();
            if !steps.is_empty() {
                if text.is_empty() {
                    text = steps.join("; ");
                } else {
                    text = format!("{text}: {}", steps.join("; "));
                }
            } else if let Some(v) = p.get("percent").or_else(|| p.get("value")) {
                text = format!("{text} {} percent", cell(v)).trim().to_string();
            }
            sentence(&text)
        }
        "confirm" => {
            let confirm_label = prop_str(p, "confirm_label")
                .unwrap_or("Confirm")
                .to_string();
            let deny_label = prop_str(p, "deny_label").unwrap_or("Cancel").to_string();
            let mut parts: Vec<String> = Vec::new();
            parts.extend(prop_str(p, "title").map(clean_inline));
            parts.extend(prop_str(p, "message").map(clean_inline));
            parts.push(format!(
                "Say {} or {}",
                clean_inline(&confirm_label),
                clean_inline(&deny_label)
            ));
            *question = Some(Question::Confirm {
                component: id,
                confirm_label,
                deny_label,
            });
            join_sentences(parts)
        }
        "choices" => {
            let options: Vec<(String, String)> = p
                .get("options")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter(|o| !o.get("disabled").and_then(Value::as_bool).unwrap_or(false))
                        .filter_map(|o| match o {
                            // Haira sends plain strings; the spec {label, value}.
                            Value::String(s) => Some((s.clone(), s.clone())),
                            Value::Object(m) => {
                                let label = m.get("label").map(cell).unwrap_or_default();
                                let value = m
                                    .get("value")
                                    .and_then(Value::as_str)
                                    .map(str::to_string)
                                    .unwrap_or_else(|| label.clone());
                                (!label.is_empty()).then_some((label, value))
                            }
                            _ => None,
                        })
                        .collect()
                })
                .unwrap_or_default();
            let listed: Vec<String> = options
                .iter()
                .enumerate()
                .map(|(i, (l, _))| format!("{}, {}", i + 1, clean_inline(l)))
                .collect();
            let mut parts: Vec<String> =
                prop_str(p, "title").map(clean_inline).into_iter().collect();
            if !listed.is_empty() {
                parts.push(format!("Options: {}", listed.join("; ")));
                *question = Some(Question::Choices {
                    component: id,
                    options,
                });
            }
            join_sentences(parts)
        }
        "form" => {
            let fields: Vec<String> = p
                .get("fields")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|f| {
                            f.get("label")
                                .or_else(|| f.get("name"))
                                .map(cell)
                                .filter(|s| !s.is_empty())
                        })
                        .collect()
                })
                .unwrap_or_default();
            let mut parts: Vec<String> = Vec::new();
            parts.extend(prop_str(p, "title").map(clean_inline));
            parts.extend(prop_str(p, "description").map(clean_inline));
            if !fields.is_empty() {
                parts.push(format!(
                    "This form asks for {}. Tell me your answers",
                    fields.join(", ")
                ));
            }
            join_sentences(parts)
        }
        "code-block" => {
            let code = prop_str(p, "code").unwrap_or("");
            code_summary(
                prop_str(p, "title"),
                prop_str(p, "language").unwrap_or(""),
                code.lines().count(),
            )
        }
        "diff" => {
            // diff -> code-block: the changed lines are what it has.
            let lines = ["diff", "patch", "content"]
                .iter()
                .find_map(|k| prop_str(p, k))
                .map_or(0, |d| d.lines().count());
            let title = prop_str(p, "title").or_else(|| prop_str(p, "filename"));
            code_summary(title, "diff", lines)
        }
        "image" => {
            let alt = prop_str(p, "alt").or_else(|| prop_str(p, "caption"));
            match alt {
                Some(a) => format!("Image: {}", sentence(&clean_inline(a))),
                None => "An image.".into(),
            }
        }
        "product-cards" => {
            let cards: Vec<String> = p
                .get("products")
                .or_else(|| p.get("cards"))
                .or_else(|| p.get("items"))
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .take(settings.table_rows)
                        .map(|c| {
                            let name = c.get("name").or_else(|| c.get("title")).map(cell);
                            let price = c.get("price").map(cell);
                            [name, price]
                                .into_iter()
                                .flatten()
                                .filter(|s| !s.is_empty())
                                .collect::<Vec<_>>()
                                .join(", ")
                        })
                        .collect()
                })
                .unwrap_or_default();
            join_sentences(
                prop_str(p, "title")
                    .map(clean_inline)
                    .into_iter()
                    .chain(cards),
            )
        }
        "group" | "tabs" | "split" => {
            if depth >= MAX_GROUP_DEPTH {
                tracing::warn!(
                    depth,
                    "component nesting deeper than 3 skipped (the spec rejects it)"
                );
                return String::new();
            }
            let children = p
                .get("children")
                .or_else(|| p.get("tabs"))
                .or_else(|| p.get("panes"))
                .or_else(|| c.get("children"))
                .and_then(Value::as_array);
            let mut parts: Vec<String> =
                prop_str(p, "title").map(clean_inline).into_iter().collect();
            for child in children.into_iter().flatten() {
                // Haira: {component, props}; spec: a Component.
                let child = match child.get("component").and_then(Value::as_str) {
                    Some(ty) if child.get("type").is_none() => serde_json::json!({
                        "type": ty,
                        "props": child.get("props").cloned().unwrap_or(Value::Null),
                    }),
                    _ => child.clone(),
                };
                let name = prop_str(props(&child), "label").map(clean_inline);
                parts.extend(name);
                parts.push(speak_component(&child, settings, depth + 1, question));
            }
            join_sentences(parts)
        }
        _ => {
            // Unknown (x-*, s-*, newer core types): follow the catalogue chain to text, which reads
            // whatever words the props carry.
            let words: Vec<String> = [
                "title",
                "text",
                "content",
                "message",
                "label",
                "description",
            ]
            .iter()
            .filter_map(|k| prop_str(p, k).map(clean_markdown))
            .collect();
            if words.is_empty() {
                tracing::debug!(ty, "component with nothing to say skipped");
            }
            join_sentences(words)
        }
    }
}

fn capitalise(s: &str) -> String {
    let mut cs = s.chars();
    match cs.next() {
        Some(c) => c.to_uppercase().chain(cs).collect(),
        None => String::new(),
    }
}

/// chart -> table: labels are the rows, each dataset a column (the first header is empty).
fn chart_to_table(p: &Map<String, Value>) -> Map<String, Value> {
    let labels: Vec<Value> = p
        .get("labels")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let datasets: Vec<Value> = p
        .get("datasets")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let mut headers = vec![Value::String(String::new())];
    for d in &datasets {
        headers.push(
            d.get("label")
                .cloned()
                .unwrap_or(Value::String(String::new())),
        );
    }
    let rows: Vec<Value> = labels
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let mut row = vec![l.clone()];
            for d in &datasets {
                row.push(
                    d.get("data")
                        .and_then(Value::as_array)
                        .and_then(|a| a.get(i))
                        .cloned()
                        .unwrap_or(Value::Null),
                );
            }
            Value::Array(row)
        })
        .collect();
    let mut t = Map::new();
    if let Some(title) = p.get("title") {
        t.insert("title".into(), title.clone());
    }
    t.insert("headers".into(), Value::Array(headers));
    t.insert("rows".into(), Value::Array(rows));
    t
}

/// A table: "{title}. {n} rows. {h1} {v1}, {h2} {v2}. … And N more rows." A chart's table (first
/// header empty) reads "{label}: {series} {value}." per row, without the count.
fn speak_table(p: &Map<String, Value>, settings: &RenderSettings, from_chart: bool) -> String {
    // Haira may send tabs: [{name, headers, rows}].
    if let Some(tabs) = p.get("tabs").and_then(Value::as_array)
        && p.get("rows").is_none()
    {
        let mut parts: Vec<String> = prop_str(p, "title").map(clean_inline).into_iter().collect();
        for tab in tabs {
            if let Some(t) = tab.as_object() {
                let mut inner = t.clone();
                if let Some(name) = t.get("name") {
                    inner.insert("title".into(), name.clone());
                }
                parts.push(speak_table(&inner, settings, from_chart));
            }
        }
        return join_sentences(parts);
    }
    let headers: Vec<String> = p
        .get("headers")
        .or_else(|| p.get("columns"))
        .and_then(Value::as_array)
        .map(|a| a.iter().map(cell).collect())
        .unwrap_or_default();
    let rows: Vec<&Value> = p
        .get("rows")
        .and_then(Value::as_array)
        .map(|a| a.iter().collect())
        .unwrap_or_default();
    let mut parts: Vec<String> = prop_str(p, "title").map(clean_inline).into_iter().collect();
    if !from_chart {
        parts.push(plural(rows.len(), "row", "rows"));
    }
    for row in rows.iter().take(settings.table_rows) {
        let cells: Vec<String> = match row {
            Value::Array(a) => a.iter().map(cell).collect(),
            // A row as an object: values in header order, else in the object's order.
            Value::Object(o) if !headers.is_empty() => headers
                .iter()
                .map(|h| o.get(h).map(cell).unwrap_or_default())
                .collect(),
            Value::Object(o) => o.values().map(cell).collect(),
            other => vec![cell(other)],
        };
        let pair = |i: usize, v: &String| {
            let h = headers.get(i).map(String::as_str).unwrap_or("");
            if h.is_empty() {
                v.clone()
            } else {
                format!("{h} {v}")
            }
        };
        let text = if from_chart || headers.first().is_some_and(String::is_empty) {
            let label = cells.first().cloned().unwrap_or_default();
            let rest: Vec<String> = cells
                .iter()
                .enumerate()
                .skip(1)
                .map(|(i, v)| pair(i, v))
                .collect();
            format!("{label}: {}", rest.join(", "))
        } else {
            cells
                .iter()
                .enumerate()
                .map(|(i, v)| pair(i, v))
                .collect::<Vec<_>>()
                .join(", ")
        };
        parts.push(text);
    }
    if rows.len() > settings.table_rows {
        let more = rows.len() - settings.table_rows;
        parts.push(format!(
            "And {more} more {}",
            if more == 1 { "row" } else { "rows" }
        ));
    }
    join_sentences(parts)
}

/// Set `path` (dots; array indices as numbers) inside a component.
fn set_path(c: &mut Value, path: &str, value: Value) -> bool {
    let mut cur = c;
    let parts: Vec<&str> = path.split('.').filter(|s| !s.is_empty()).collect();
    let Some((last, head)) = parts.split_last() else {
        return false;
    };
    for part in head {
        cur = match cur {
            Value::Object(m) => m
                .entry(part.to_string())
                .or_insert_with(|| Value::Object(Map::new())),
            Value::Array(a) => match part.parse::<usize>().ok().and_then(|i| a.get_mut(i)) {
                Some(v) => v,
                None => return false,
            },
            _ => return false,
        };
    }
    match cur {
        Value::Object(m) => {
            m.insert(last.to_string(), value);
            true
        }
        Value::Array(a) => match last.parse::<usize>().ok().and_then(|i| a.get_mut(i)) {
            Some(v) => {
                *v = value;
                true
            }
            None => false,
        },
        _ => false,
    }
}

fn normalise_words(s: &str) -> Vec<String> {
    s.to_lowercase()
        .split(|c: char| !(c.is_alphanumeric() || c == '\''))
        .filter(|w| !w.is_empty())
        .map(str::to_string)
        .collect()
}

fn contains_seq(words: &[String], seq: &[String]) -> bool {
    !seq.is_empty() && words.windows(seq.len()).any(|w| w == seq)
}
