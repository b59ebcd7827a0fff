//! The data path's rate limits: too-big answers (on by default, a rate in range) and the
//! budget of pins of flows not seen opening.
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

#[test]
fn the_budget_of_unseen_pins_has_a_default_and_is_bounded() {
    let c = Config::parse(&with("")).unwrap();
    assert_eq!(c.unseen_pins_per_second, 20_000);
    let c = Config::parse(&with(r#", "unseen_pins_per_second": 7"#)).unwrap();
    assert_eq!(c.unseen_pins_per_second, 7);
    for bad in ["0", "10000001", "-1", "\"many\""] {
        let e = Config::parse(&with(&format!(r#", "unseen_pins_per_second": {bad}"#)));
        assert!(e.is_err(), "{bad} accepted");
    }
    let e = Config::parse(&with(r#", "unseen_pins_per_second": 0"#)).unwrap_err();
    assert_eq!(e.field, "unseen_pins_per_second");
}
