//! The too-big answer settings: on by default, a rate in range.
use super::*;

fn with(fields: &str) -> String {
    format!(r#"{{ "interfaces": ["eth0"], "agent_address": {{"v4": "10.0.0.1"}}{fields} }}"#)
}

#[test]
fn too_big_answers_are_on_by_default_and_their_rate_is_bounded() {
    let c = Config::parse(&with("")).unwrap();
    assert!(c.answer_too_big);
    assert_eq!(c.too_big_answers_per_second, 1000);
    let c = Config::parse(&with(
        r#", "answer_too_big": false, "too_big_answers_per_second": 5"#,
    ))
    .unwrap();
    assert!(!c.answer_too_big);
    assert_eq!(c.too_big_answers_per_second, 5);
    for bad in ["0", "1000001"] {
        let e =
            Config::parse(&with(&format!(r#", "too_big_answers_per_second": {bad}"#))).unwrap_err();
        assert_eq!(e.field, "too_big_answers_per_second", "{bad}");
    }
}
