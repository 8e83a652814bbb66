//! The Minimal renderer: sentence cutting, markup stripping, the component fallback chain, spoken
//! answers to questions, patches and the length cap.

use hearken::render::{Answer, CAP_NOTICE, Question, RenderSettings, Renderer, clean_markdown};
use serde_json::json;

fn all(r: &mut Renderer, deltas: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    for d in deltas {
        out.extend(r.push_text(d));
    }
    out.extend(r.finish());
    out
}

#[test]
fn first_sentence_is_ready_before_the_reply_ends() {
    let mut r = Renderer::default();
    assert!(r.push_text("Hello there").is_empty());
    // The stop alone is not enough: "3.5" or "example.com" could follow.
    assert!(r.push_text("!").is_empty());
    assert_eq!(r.push_text(" How"), vec!["Hello there!"]);
    assert!(r.push_text(" are you").is_empty());
    assert_eq!(r.finish(), vec!["How are you"]);
}

#[test]
fn abbreviations_initials_numbers_and_list_numbers_do_not_end_sentences() {
    let mut r = Renderer::default();
    let out = all(
        &mut r,
        &[
            "Dr. Smith met J. R. R. Tolkien at 3.5 p.m. on Jan. 4, e.g. at noon. ",
            "It costs $4.99 (approx. half). Visit example.com now! Really?! Yes...",
            " done.",
        ],
    );
    assert_eq!(
        out,
        vec![
            "Dr. Smith met J. R. R. Tolkien at 3.5 p.m. on Jan. 4, e.g. at noon.",
            "It costs $4.99 (approx. half).",
            "Visit example.com now!",
            "Really?!",
            "Yes...",
            "done.",
        ]
    );
}

#[test]
fn line_breaks_end_sentences_and_list_markers_are_not_read() {
    let mut r = Renderer::default();
    let out = all(
        &mut r,
        &[
            "## Results\n\n1. First item\n2. Second",
            " item\n- a bullet\n> quoted",
        ],
    );
    assert_eq!(
        out,
        vec!["Results", "First item", "Second item", "a bullet", "quoted"]
    );
}

#[test]
fn markdown_html_entities_and_control_characters_are_stripped() {
    assert_eq!(
        clean_markdown(
            "**Bold** and _it_ and `code` and [the docs](https://x.y/z) ![a cat](c.png)"
        ),
        "Bold and it and code and the docs a cat"
    );
    assert_eq!(
        clean_markdown("<p>Tom &amp; Jerry&#39;s <b>show</b></p>\u{7}\u{1b} is &lt;great&gt;"),
        "Tom & Jerry's show is <great>"
    );
    assert_eq!(
        clean_markdown("see https://example.com/x for more"),
        "see a link for more"
    );
    assert_eq!(
        clean_markdown("| Region | Q1 |\n|---|---|\n| North | 100 |"),
        "Region, Q1 North, 100"
    );
    assert_eq!(
        clean_markdown("snake_case_name stays ~~struck~~"),
        "snake case name stays struck"
    );
    assert_eq!(clean_markdown("1 < 2 and 3 > 2"), "1 < 2 and 3 > 2");
}

#[test]
fn code_blocks_are_summarised_even_when_split_across_deltas() {
    let mut r = Renderer::default();
    let out = all(
        &mut r,
        &[
            "Here is the fix.\n`",
            "``pyth",
            "on\ndef f():\n    return 1. Not a sentence.\n",
            "print(f())\n``",
            "`\nThat should work.",
        ],
    );
    assert_eq!(
        out,
        vec![
            "Here is the fix.",
            "A python code block of 3 lines, not read aloud.",
            "That should work.",
        ]
    );
    // A fence that never closes is still summarised, not read.
    let mut r = Renderer::default();
    assert_eq!(
        all(&mut r, &["Run:\n```\nrm -rf /tmp/x\n"]),
        vec!["Run:", "A code block of 1 line, not read aloud."]
    );
}

#[test]
fn a_long_reply_is_cut_with_a_spoken_notice() {
    let mut r = Renderer::new(RenderSettings {
        max_spoken_chars: 60,
        table_rows: 5,
    });
    let mut out = Vec::new();
    for i in 0..20 {
        out.extend(r.push_text(&format!("This is sentence number {i}. ")));
    }
    out.extend(r.finish());
    assert_eq!(
        out,
        vec![
            "This is sentence number 0.",
            "This is sentence number 1.",
            CAP_NOTICE
        ]
    );
    assert!(r.capped());
    // The next reply starts afresh.
    r.reset();
    assert_eq!(all(&mut r, &["Short. "]), vec!["Short."]);
}

fn speak(c: serde_json::Value) -> String {
    Renderer::default().component(&c).join(" ")
}

#[test]
fn tables_are_read_as_a_summary_and_their_first_rows() {
    let t = json!({"id":"c_1","type":"table","props":{"title":"Sales","headers":["Region","Q1"],
        "rows":[["North","100"],["South",200]]}});
    assert_eq!(
        speak(t),
        "Sales. 2 rows. Region North, Q1 100. Region South, Q1 200."
    );
    let rows: Vec<_> = (1..=8).map(|i| json!([format!("r{i}"), i])).collect();
    let big = json!({"type":"table","props":{"headers":["Name","N"],"rows":rows}});
    let mut r = Renderer::new(RenderSettings {
        max_spoken_chars: 10_000,
        table_rows: 2,
    });
    assert_eq!(
        r.component(&big).join(" "),
        "8 rows. Name r1, N 1. Name r2, N 2. And 6 more rows."
    );
}

#[test]
fn a_chart_falls_back_to_a_table_then_to_text() {
    let c = json!({"id":"c_2","type":"chart","props":{"type":"bar","title":"Sales",
        "labels":["North","South"],"datasets":[{"label":"Q1","data":[100,200]}]}});
    assert_eq!(speak(c), "Sales. North: Q1 100. South: Q1 200.");
    let two = json!({"type":"chart","props":{"labels":["Mon","Tue"],
        "datasets":[{"label":"rain","data":[1,2]},{"label":"sun","data":[5,6]}]}});
    assert_eq!(speak(two), "Mon: rain 1, sun 5. Tue: rain 2, sun 6.");
}

#[test]
fn a_precomputed_fallback_is_used_first() {
    let c = json!({"id":"x","type":"x-acme-map","props":{"lat":1},
        "fallback":{"type":"text","props":{"content":"A map of **Paris**."}}});
    assert_eq!(speak(c), "A map of Paris.");
    // A fallback that is itself unsupported follows its own chain.
    let c = json!({"type":"chart","props":{},"fallback":{"type":"table",
        "props":{"headers":["A"],"rows":[["1"]]}}});
    assert_eq!(speak(c), "1 row. A 1.");
}

#[test]
fn every_component_type_has_a_spoken_form() {
    let cases = [
        (
            json!({"type":"text","props":{"text":"Plain *text*"}}),
            "Plain text",
        ),
        (
            json!({"type":"markdown","props":{"title":"Notes","content":"- one\n- two\n```\ncode\n```"}}),
            "Notes. one. two. A code block of 1 line, not read aloud.",
        ),
        (
            json!({"type":"status-card","props":{"status":"success","title":"Deployed","message":"All good"}}),
            "Success: Deployed. All good.",
        ),
        (
            json!({"type":"key-value","props":{"title":"Order","items":[{"key":"Id","value":"42"},{"key":"Total","value":"$9"}]}}),
            "Order. Id: 42; Total: $9.",
        ),
        (
            json!({"type":"progress","props":{"title":"Build","steps":[{"name":"compile","status":"done"},{"name":"test","status":"active"}]}}),
            "Build: compile done; test active.",
        ),
        (
            json!({"type":"code-block","props":{"title":"main.rs","language":"rust","code":"fn main() {\n}\n"}}),
            "main.rs. A rust code block of 2 lines, not read aloud.",
        ),
        (
            json!({"type":"diff","props":{"title":"fix","diff":"-a\n+b\n+c"}}),
            "fix. A diff code block of 3 lines, not read aloud.",
        ),
        (
            json!({"type":"image","props":{"src":"x.png","alt":"A red bicycle"}}),
            "Image: A red bicycle.",
        ),
        (json!({"type":"image","props":{"src":"x.png"}}), "An image."),
        (
            json!({"type":"form","props":{"title":"Sign up","fields":[{"name":"n","label":"Name"},{"name":"e","label":"Email"}]}}),
            "Sign up. This form asks for Name, Email. Tell me your answers.",
        ),
        (
            json!({"type":"product-cards","props":{"products":[{"name":"Widget","price":"$5"}]}}),
            "Widget, $5.",
        ),
        // Haira's group shape: children as {component, props}.
        (
            json!({"type":"group","props":{"children":[{"component":"text","props":{"text":"First."}},
            {"component":"status-card","props":{"status":"info","title":"Second"}}]}}),
            "First. Info: Second.",
        ),
        // tabs -> group -> children in order.
        (
            json!({"type":"tabs","props":{"tabs":[{"type":"text","props":{"label":"One","content":"Alpha"}}]}}),
            "One. Alpha.",
        ),
        (
            json!({"type":"s-weather","props":{"title":"Rain at noon"}}),
            "Rain at noon.",
        ),
        (json!({"type":"x-nothing","props":{"n":1}}), ""),
    ];
    for (c, want) in cases {
        assert_eq!(speak(c.clone()), want, "{c}");
    }
}

#[test]
fn groups_nested_deeper_than_three_are_not_read() {
    let mut c = json!({"type":"text","props":{"text":"deep"}});
    for _ in 0..4 {
        c = json!({"type":"group","props":{"children":[c]}});
    }
    assert_eq!(speak(c.clone()), "");
    let shallow = json!({"type":"group","props":{"children":[{"type":"group","props":{"children":[
        {"type":"text","props":{"text":"ok"}}]}}]}});
    assert_eq!(speak(shallow), "ok.");
}

#[test]
fn confirm_is_asked_and_the_spoken_answer_matches_it() {
    let mut r = Renderer::default();
    let said = r.component(
        &json!({"id":"c_9","type":"confirm","props":{"title":"Delete the file?",
        "confirm_label":"Delete","deny_label":"Keep it"}}),
    );
    assert_eq!(said.join(" "), "Delete the file? Say Delete or Keep it.");
    assert!(matches!(r.question(), Some(Question::Confirm { .. })));
    assert_eq!(
        r.answer("Yes please"),
        Answer {
            text: "[Confirmed] Delete".into(),
            component: Some("c_9".into())
        }
    );
    assert!(r.question().is_none());
    r.component(&json!({"type":"confirm","props":{"title":"Sure?"}}));
    assert_eq!(r.answer("no, keep it").text, "[Denied] Cancel");
    r.component(&json!({"type":"confirm","props":{"title":"Sure?"}}));
    assert_eq!(r.answer("yes, no problem").text, "[Confirmed] Confirm");
    r.component(&json!({"type":"confirm","props":{"title":"Sure?","deny_label":"Keep it"}}));
    assert_eq!(r.answer("keep it").text, "[Denied] Keep it");
    // An answer that is no answer goes as said.
    r.component(&json!({"type":"confirm","props":{"title":"Sure?"}}));
    assert_eq!(r.answer("what is the weather").text, "what is the weather");
    // No question: the transcript as it is.
    assert_eq!(r.answer("hello").text, "hello");
}

#[test]
fn choices_are_listed_and_answered_by_name_or_position() {
    let mut r = Renderer::default();
    let c = json!({"id":"c_3","type":"choices","props":{"title":"Which size?",
        "options":[{"label":"Small","value":"s"},{"label":"Extra large","value":"xl"},
                   {"label":"Gone","value":"g","disabled":true}]}});
    assert_eq!(
        r.component(&c).join(" "),
        "Which size? Options: 1, Small; 2, Extra large."
    );
    assert_eq!(r.answer("extra large please").text, "Extra large");
    r.component(&c);
    assert_eq!(r.answer("the first one").text, "Small");
    r.component(&c);
    assert_eq!(r.answer("the second one").text, "Extra large");
    // Haira's string options.
    r.component(&json!({"type":"choices","props":{"options":["red","green"]}}));
    assert_eq!(r.answer("Number two").text, "green");
    r.component(&c);
    assert_eq!(
        r.answer("none of them"),
        Answer {
            text: "none of them".into(),
            component: None
        }
    );
}

#[test]
fn patches_update_components_and_changed_ones_are_spoken_again() {
    let mut r = Renderer::default();
    r.component(&json!({"id":"t1","type":"table","props":{"headers":["Item","Price"],"rows":[]}}));
    let (said, skipped) = r.patch(&[
        json!({"op":"update","target":"t1","path":"props.rows",
            "value":[["Widget A","$29.99"],["Widget B","$39.99"]]}),
        json!({"op":"remove","target":"nope"}),
        json!({"op":"explode","target":"t1"}),
    ]);
    assert_eq!(
        said.join(" "),
        "2 rows. Item Widget A, Price $29.99. Item Widget B, Price $39.99."
    );
    assert_eq!(skipped.len(), 2, "{skipped:?}");
    let (said, skipped) = r.patch(&[
        json!({"op":"insert","after":"t1","component":{"id":"s","type":"status-card","props":{"status":"info","title":"Added"}}}),
        json!({"op":"reorder","target":"s","after":null}),
        json!({"op":"remove","target":"t1"}),
    ]);
    assert_eq!(said, vec!["Info: Added."]);
    assert!(skipped.is_empty());
}

#[test]
fn pending_text_is_spoken_before_a_component() {
    let mut r = Renderer::default();
    assert!(r.push_text("Here are the numbers").is_empty());
    let out = r.component(&json!({"type":"text","props":{"text":"Done."}}));
    assert_eq!(out, vec!["Here are the numbers", "Done."]);
}

#[test]
fn run_on_text_is_spoken_in_pieces_and_capped() {
    let mut r = Renderer::new(RenderSettings {
        max_spoken_chars: 700,
        table_rows: 5,
    });
    let mut out = Vec::new();
    for i in 0..600 {
        out.extend(r.push_text(&format!("w{i} ")));
    }
    // Without a sentence end, pieces of at most 300 characters go out as the text streams...
    assert!(out.len() >= 2, "{out:?}");
    assert!(out.iter().all(|s| s.len() <= 300), "{out:?}");
    assert!(out[0].starts_with("w0 w1 "));
    out.extend(r.finish());
    // ...and the cap still holds, with its notice.
    assert_eq!(out.last().map(String::as_str), Some(CAP_NOTICE));
    let spoken: usize = out[..out.len() - 1].iter().map(|s| s.chars().count()).sum();
    assert!(spoken <= 700, "{spoken}");
    // One sentence longer than the whole budget is cut at a word.
    let mut r = Renderer::new(RenderSettings {
        max_spoken_chars: 100,
        table_rows: 5,
    });
    let long = format!("{}.", "word ".repeat(25).trim_end());
    let out = r.push_text(&format!("{long} Next. "));
    assert_eq!(out.len(), 2, "{out:?}");
    assert!(out[0].chars().count() <= 100 && out[0].starts_with("word word"));
    assert_eq!(out[1], CAP_NOTICE);
}
