//! The terminal side of `top`: a full-screen view redrawn every interval (crossterm: raw
//! mode for single keys, the alternate screen, restored on every way out), or plain blocks
//! of lines when stdout is not a terminal.
use std::{
    io::{IsTerminal as _, Write},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use crossterm::{
    cursor, event, execute, queue,
    style::{Attribute, Print, SetAttribute},
    terminal::{self, ClearType},
};
use tokio::sync::mpsc;

use super::{lines, view, Sample};
use crate::control_socket::{call, Request, Response, Status};

/// How long one answer may take before the view says the agent is not answering.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

async fn status(socket: &Path) -> Result<Status> {
    let answer = tokio::time::timeout(ANSWER_TIMEOUT, call(socket, &Request::Status))
        .await
        .map_err(|_| anyhow::anyhow!("no answer within {}s", ANSWER_TIMEOUT.as_secs()))?;
    match answer? {
        Response::Status(s) => Ok(*s),
        Response::Error { message } => bail!("{message}"),
        other => bail!("unexpected answer {other:?}"),
    }
}

/// Runs the view: every `interval`, `count` times (forever when `None`). On a terminal, `q`
/// (or Esc, or Ctrl-C) quits; otherwise each refresh prints a block of plain lines.
pub async fn run(socket: &Path, interval: Duration, count: Option<u64>) -> Result<()> {
    let start = Instant::now();
    // The agent must answer once: a wrong socket or a refusal is an error at once.
    let first = Sample {
        at: start.elapsed(),
        status: status(socket).await?,
    };
    if std::io::stdout().is_terminal() {
        interactive(socket, interval, count, start, first).await
    } else {
        plain(socket, interval, count, start, first).await
    }
}

fn clock() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format!(
        "{:02}:{:02}:{:02} UTC",
        secs / 3600 % 24,
        secs / 60 % 60,
        secs % 60
    )
}

fn title(socket: &Path, interval: Duration, keys: bool) -> String {
    format!(
        "anycast-ctl top: {} every {:.1}s{}  {}",
        socket.display(),
        interval.as_secs_f64(),
        if keys { "  (q quits)" } else { "" },
        clock()
    )
}

async fn plain(
    socket: &Path,
    interval: Duration,
    count: Option<u64>,
    start: Instant,
    first: Sample,
) -> Result<()> {
    let mut out = std::io::stdout().lock();
    let mut prev: Option<Sample> = None;
    let mut cur = Ok(first);
    let mut shown = 0;
    loop {
        writeln!(out, "{}", title(socket, interval, false))?;
        match &cur {
            Ok(sample) => {
                for l in lines(&view(prev.as_ref(), sample), 200) {
                    writeln!(out, "{l}")?;
                }
            }
            Err(e) => writeln!(out, "agent not answering: {e:#}")?,
        }
        writeln!(out)?;
        // A reader that went away (a closed pipe) ends the view.
        out.flush()?;
        shown += 1;
        if count.is_some_and(|c| shown >= c) {
            return Ok(());
        }
        tokio::time::sleep(interval).await;
        let fetched = status(socket).await;
        if let Ok(s) = cur {
            prev = Some(s);
        }
        cur = fetched.map(|status| Sample {
            at: start.elapsed(),
            status,
        });
    }
}

/// Puts the terminal back whichever way the view ends.
struct Screen;

impl Screen {
    fn enter() -> Result<Screen> {
        terminal::enable_raw_mode().context("switching the terminal to raw mode")?;
        let screen = Screen;
        execute!(
            std::io::stdout(),
            terminal::EnterAlternateScreen,
            cursor::Hide
        )?;
        Ok(screen)
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        let _ = execute!(
            std::io::stdout(),
            cursor::Show,
            terminal::LeaveAlternateScreen
        );
        let _ = terminal::disable_raw_mode();
    }
}

enum Key {
    Quit,
    Redraw,
}

/// Reads keys on a thread of its own (crossterm's reads block): q, Esc or Ctrl-C quit; a
/// resize redraws.
fn keys() -> mpsc::UnboundedReceiver<Key> {
    let (tx, rx) = mpsc::unbounded_channel();
    std::thread::spawn(move || loop {
        if tx.is_closed() {
            return;
        }
        match event::poll(Duration::from_millis(200)) {
            Ok(false) => continue,
            Ok(true) => {}
            Err(_) => {
                let _ = tx.send(Key::Quit);
                return;
            }
        }
        let key = match event::read() {
            Ok(event::Event::Key(k)) if k.kind != event::KeyEventKind::Release => match k.code {
                event::KeyCode::Char('q') | event::KeyCode::Char('Q') | event::KeyCode::Esc => {
                    Some(Key::Quit)
                }
                event::KeyCode::Char('c') if k.modifiers.contains(event::KeyModifiers::CONTROL) => {
                    Some(Key::Quit)
                }
                _ => None,
            },
            Ok(event::Event::Resize(..)) => Some(Key::Redraw),
            Ok(_) => None,
            Err(_) => Some(Key::Quit),
        };
        if let Some(k) = key {
            let quit = matches!(k, Key::Quit);
            if tx.send(k).is_err() || quit {
                return;
            }
        }
    });
    rx
}

fn draw(socket: &Path, interval: Duration, body: &[String]) -> Result<()> {
    let (width, height) = terminal::size().unwrap_or((100, 30));
    let mut out = std::io::stdout().lock();
    queue!(out, terminal::Clear(ClearType::All), cursor::MoveTo(0, 0))?;
    let head: String = title(socket, interval, true)
        .chars()
        .take(width as usize)
        .collect();
    queue!(
        out,
        SetAttribute(Attribute::Reverse),
        Print(format!("{head:<w$}", w = width as usize)),
        SetAttribute(Attribute::Reset)
    )?;
    for (row, l) in body
        .iter()
        .enumerate()
        .take(height.saturating_sub(1) as usize)
    {
        queue!(out, cursor::MoveTo(0, row as u16 + 1), Print(l))?;
    }
    out.flush()?;
    Ok(())
}

async fn interactive(
    socket: &Path,
    interval: Duration,
    count: Option<u64>,
    start: Instant,
    first: Sample,
) -> Result<()> {
    let _screen = Screen::enter()?;
    let mut keys = keys();
    let mut prev: Option<Sample> = None;
    let mut cur = Ok(first);
    let mut shown = 0;
    let mut next = tokio::time::Instant::now();
    loop {
        let width = terminal::size().map_or(100, |(w, _)| w as usize);
        let body = match &cur {
            Ok(sample) => lines(&view(prev.as_ref(), sample), width),
            Err(e) => vec![format!("agent not answering: {e:#}")],
        };
        draw(socket, interval, &body)?;
        shown += 1;
        if count.is_some_and(|c| shown >= c) {
            return Ok(());
        }
        next += interval;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(next) => break,
                k = keys.recv() => match k {
                    Some(Key::Redraw) => {
                        let width = terminal::size().map_or(100, |(w, _)| w as usize);
                        let body = match &cur {
                            Ok(sample) => lines(&view(prev.as_ref(), sample), width),
                            Err(e) => vec![format!("agent not answering: {e:#}")],
                        };
                        draw(socket, interval, &body)?;
                    }
                    Some(Key::Quit) | None => return Ok(()),
                },
            }
        }
        // Keys are read while the agent answers, too: `q` never waits for it.
        let fetched = tokio::select! {
            r = status(socket) => r,
            k = keys.recv() => match k {
                Some(Key::Redraw) => continue,
                Some(Key::Quit) | None => return Ok(()),
            },
        };
        if let Ok(s) = cur {
            prev = Some(s);
        }
        cur = fetched.map(|status| Sample {
            at: start.elapsed(),
            status,
        });
    }
}
