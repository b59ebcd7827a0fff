//! Comments in the configuration file: `//` to the end of the line, outside strings, so an
//! example can explain each field beside it (the packaged /etc/anycast/agent.json.example).
//! A comment becomes spaces, and its line break stays: the parser's line and column in an
//! error still point into the file as written.

/// The text with every `//` comment outside a string blanked out.
pub fn strip(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    let mut in_string = false;
    while let Some(c) = chars.next() {
        if in_string {
            out.push(c);
            match c {
                // An escaped character (`\"`, `\\`) never ends the string.
                '\\' => out.extend(chars.next()),
                '"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => {
                in_string = true;
                out.push(c);
            }
            '/' if chars.peek() == Some(&'/') => {
                out.push(' ');
                while let Some(&next) = chars.peek() {
                    if next == '\n' {
                        break;
                    }
                    out.push(' ');
                    chars.next();
                }
            }
            _ => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::strip;

    #[test]
    fn comments_outside_strings_become_spaces() {
        let text = "{ // the services\n  \"a\": 1 // one\n}\n// end";
        let stripped = strip(text);
        assert_eq!(stripped.lines().count(), text.lines().count());
        let v: serde_json::Value = serde_json::from_str(&stripped).unwrap();
        assert_eq!(v, serde_json::json!({ "a": 1 }));
    }

    #[test]
    fn slashes_inside_strings_stay() {
        let text = r#"{ "url": "http://x//y", "q": "a\"//b", "e": "\\" } // c"#;
        let v: serde_json::Value = serde_json::from_str(&strip(text)).unwrap();
        assert_eq!(v["url"], "http://x//y");
        assert_eq!(v["q"], "a\"//b");
        assert_eq!(v["e"], "\\");
    }

    #[test]
    fn a_single_slash_is_left_to_the_parser() {
        assert!(serde_json::from_str::<serde_json::Value>(&strip("{ / }")).is_err());
        assert_eq!(strip("/"), "/");
    }

    #[test]
    fn errors_keep_their_line_and_column() {
        let text = "{\n  // a comment\n  \"a\": x\n}";
        let e = serde_json::from_str::<serde_json::Value>(&strip(text)).unwrap_err();
        assert_eq!((e.line(), e.column()), (3, 8));
    }
}
