//! BIRD's control socket (`bird -s PATH`, what `birdc` uses): a line protocol. Each reply
//! line starts with a four-digit code and `-` (more lines follow) or ` ` (the last line);
//! a line starting with a space continues the previous code. Codes 0xxx end a command,
//! 1xxx/2xxx are table rows and headers, 8xxx runtime errors, 9xxx parse errors.
use std::{path::Path, time::Duration};

use anyhow::{bail, Context as _, Result};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
    net::{
        unix::{OwnedReadHalf, OwnedWriteHalf},
        UnixStream,
    },
};

use super::{BfdSession, ProtocolStatus};

/// Longest wait for a reply; BIRD answers in milliseconds unless it is stuck.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(3);
/// Most lines read for one reply (a stuck or hostile peer cannot keep us reading).
const MAX_LINES: usize = 100_000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The code of the last line.
    pub code: u16,
    /// Every line: its code (continuations take the previous one) and its text.
    pub lines: Vec<(u16, String)>,
}

impl Reply {
    pub fn is_error(&self) -> bool {
        self.code >= 8000
    }

    /// The text of the last line.
    pub fn last(&self) -> &str {
        self.lines.last().map_or("", |(_, t)| t.as_str())
    }
}

/// Parses one reply line: `Some((code, final, text))`, or `(None)` code for a continuation.
fn parse_line(line: &str) -> Result<(Option<u16>, bool, String)> {
    let line = line.trim_end_matches(['\n', '\r']);
    if let Some(rest) = line.strip_prefix(' ') {
        return Ok((None, false, rest.to_string()));
    }
    let b = line.as_bytes();
    if b.len() >= 5 && b[..4].iter().all(u8::is_ascii_digit) && matches!(b[4], b'-' | b' ') {
        let code = line[..4].parse().expect("four digits");
        return Ok((Some(code), b[4] == b' ', line[5..].to_string()));
    }
    bail!("unexpected line from BIRD: {line:?}")
}

pub struct Bird {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    /// The greeting, e.g. `BIRD 2.0.12 ready.`
    pub greeting: String,
}

impl Bird {
    pub async fn connect(path: &Path) -> Result<Bird> {
        let stream = tokio::time::timeout(REPLY_TIMEOUT, UnixStream::connect(path))
            .await
            .with_context(|| format!("connecting to BIRD at {}: timed out", path.display()))?
            .with_context(|| format!("connecting to BIRD at {}", path.display()))?;
        let (r, w) = stream.into_split();
        let mut bird = Bird {
            reader: BufReader::new(r),
            writer: w,
            greeting: String::new(),
        };
        let hello = bird.read_reply().await.context("reading BIRD's greeting")?;
        if hello.code != 1 {
            bail!("unexpected greeting from BIRD: {:?}", hello.last());
        }
        bird.greeting = hello.last().trim_end_matches(" ready.").to_string();
        Ok(bird)
    }

    async fn read_reply(&mut self) -> Result<Reply> {
        let mut lines = Vec::new();
        let mut code = 0;
        let mut line = String::new();
        for _ in 0..MAX_LINES {
            line.clear();
            let n = tokio::time::timeout(REPLY_TIMEOUT, self.reader.read_line(&mut line))
                .await
                .context("BIRD did not answer in time")??;
            if n == 0 {
                bail!("BIRD closed the control connection");
            }
            let (c, last, text) = parse_line(&line)?;
            if let Some(c) = c {
                code = c;
            }
            lines.push((code, text));
            if last {
                return Ok(Reply { code, lines });
            }
        }
        bail!("BIRD's reply exceeded {MAX_LINES} lines")
    }

    /// Sends one command (a line without newlines) and reads its whole reply.
    pub async fn command(&mut self, command: &str) -> Result<Reply> {
        if command.contains(['\n', '\r']) {
            bail!("a BIRD command is one line");
        }
        tokio::time::timeout(
            REPLY_TIMEOUT,
            self.writer.write_all(format!("{command}\n").as_bytes()),
        )
        .await
        .context("BIRD did not take the command in time")??;
        self.read_reply()
            .await
            .with_context(|| format!("BIRD's answer to `{command}`"))
    }
}

/// `show protocols`: the 1002 rows (`NAME PROTO TABLE STATE SINCE INFO`). SINCE is a time,
/// or a date and a time, so INFO is what follows the tokens that look like either.
pub fn parse_protocols(reply: &Reply) -> Vec<ProtocolStatus> {
    reply
        .lines
        .iter()
        .filter(|(code, _)| *code == 1002)
        .filter_map(|(_, text)| {
            let t: Vec<&str> = text.split_whitespace().collect();
            if t.len() < 4 {
                return None;
            }
            let info: Vec<&str> = t[4..]
                .iter()
                .copied()
                .skip_while(|s| s.contains(':') || is_date(s))
                .collect();
            Some(ProtocolStatus {
                name: t[0].to_string(),
                proto: t[1].to_string(),
                neighbor: None,
                state: t[3].to_string(),
                info: info.join(" "),
            })
        })
        .collect()
}

fn is_date(s: &str) -> bool {
    s.len() == 10 && s.bytes().filter(|&b| b == b'-').count() == 2
}

/// `show bfd sessions`: under each 1020 protocol line, a header (`IP address ...`) and one
/// row per session: address, interface, state, since (one or two tokens), interval,
/// timeout.
pub fn parse_bfd_sessions(reply: &Reply) -> Vec<BfdSession> {
    reply
        .lines
        .iter()
        .filter(|(code, _)| *code == 1020)
        .filter_map(|(_, text)| {
            let t: Vec<&str> = text.split_whitespace().collect();
            if t.len() < 6 || t[0] == "IP" {
                return None;
            }
            Some(BfdSession {
                address: t[0].to_string(),
                interface: t[1].to_string(),
                state: t[2].to_string(),
                interval: t[t.len() - 2].to_string(),
                timeout: t[t.len() - 1].to_string(),
            })
        })
        .collect()
}

/// `show status`: the `Last reboot on ...` line, which changes when BIRD restarts.
pub fn parse_last_reboot(reply: &Reply) -> Option<String> {
    reply
        .lines
        .iter()
        .find_map(|(_, t)| t.strip_prefix("Last reboot on ").map(str::to_string))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(text: &str) -> Reply {
        let mut lines = Vec::new();
        let mut code = 0;
        for l in text.lines() {
            let (c, _, t) = parse_line(l).unwrap();
            if let Some(c) = c {
                code = c;
            }
            lines.push((code, t));
        }
        Reply { code, lines }
    }

    /// Replies as BIRD 2.0.12 gave them (captured from a running daemon).
    #[test]
    fn parses_protocols_bfd_sessions_and_status() {
        let p = reply(
            "2002-Name       Proto      Table      State  Since         Info\n\
             1002-device1    Device     ---        up     03:07:44.532  \n \
             anycast_bfd BFD        ---        up     03:07:44.532  \n \
             anycast_live4 Static     master4    up     03:07:44.532  \n \
             anycast_bgp0 BGP        ---        up     2026-12-05 03:07:48  Established   \n \
             anycast_bgp1 BGP        ---        start  03:07:44.532  Active        Socket: Connection refused\n\
             0000 ",
        );
        let rows = parse_protocols(&p);
        assert_eq!(rows.len(), 5);
        assert_eq!(rows[3].name, "anycast_bgp0");
        assert_eq!(rows[3].state, "up");
        assert_eq!(rows[3].info, "Established");
        assert_eq!(rows[4].state, "start");
        assert_eq!(rows[4].info, "Active Socket: Connection refused");
        assert_eq!(rows[0].info, "");
        let b = reply(
            "1020-anycast_bfd:\n \
             IP address                Interface  State      Since         Interval  Timeout\n \
             10.73.11.1                eth0       Up         03:07:45.289    0.100    0.300\n \
             fd73:11::1                eth0       Down       03:07:45.289    1.000    0.000\n\
             0000 ",
        );
        let s = parse_bfd_sessions(&b);
        assert_eq!(s.len(), 2);
        assert_eq!(
            (
                s[0].address.as_str(),
                s[0].state.as_str(),
                s[0].timeout.as_str()
            ),
            ("10.73.11.1", "Up", "0.300")
        );
        assert_eq!(s[1].state, "Down");
        let st = reply(
            "1000-BIRD 2.0.12\n1011-Router ID is 10.73.11.2\n Last reboot on 2026-12-05 \
             03:07:44.532\n Last reconfiguration on 2026-12-05 03:07:44.532\n0013 Daemon is up \
             and running",
        );
        assert_eq!(
            parse_last_reboot(&st).as_deref(),
            Some("2026-12-05 03:07:44.532")
        );
        assert_eq!(st.code, 13);
        let e = reply("9001 syntax error, unexpected CF_SYM_UNDEFINED");
        assert!(e.is_error());
        assert!(parse_line("garbage").is_err());
    }
}
