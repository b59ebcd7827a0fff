//! A tiny service for tests and the demo, bound to the anycast address on a server:
//! TCP: `GET ...` gets an HTTP/1.0 answer `server=NAME`; `GET /bytes/N` gets N bytes (at
//! most 64 MiB) of the pattern [`body_byte`], with `X-Server: NAME`; `POST ...` with a
//! `Content-Length` (an upload) has its body read whole and gets `server=NAME` and
//! `received=BYTES`; any other line gets `NAME` back, line by line, for as long as the
//! client keeps the connection (a long-lived flow).
//! UDP: every datagram gets `server=NAME` back, sent from the anycast address.
use std::{
    io::{BufRead, BufReader, Read as _, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    thread,
};

fn usage() -> ! {
    eprintln!("usage: anycast-testsrv --name NAME [--tcp ADDR:PORT]... [--udp ADDR:PORT]...");
    std::process::exit(2)
}

fn serve_tcp(stream: TcpStream, name: &str) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut out = stream;
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Ok(());
    }
    if line.starts_with("GET ") || line.starts_with("POST ") {
        // Read the rest of the request head.
        let mut length = 0u64;
        loop {
            let mut l = String::new();
            if reader.read_line(&mut l)? == 0 || l == "\r\n" || l == "\n" {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    length = v.trim().parse().unwrap_or(0);
                }
            }
        }
        let mut body = format!("server={name}\n");
        if line.starts_with("POST ") {
            let received = std::io::copy(&mut (&mut reader).take(length), &mut std::io::sink())?;
            body.push_str(&format!("received={received}\n"));
        }
        let path = line.split_whitespace().nth(1).unwrap_or("/");
        if let (true, Some(n)) = (line.starts_with("GET "), path.strip_prefix("/bytes/")) {
            return send_bytes(out, n, name);
        }
        write!(
            out,
            "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )?;
        return Ok(());
    }
    loop {
        writeln!(out, "{name}")?;
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
    }
}

/// The answer to `GET /bytes/N`: N bytes of [`body_byte`] (400 for N not a number or above
/// 64 MiB).
fn send_bytes(mut out: TcpStream, n: &str, name: &str) -> std::io::Result<()> {
    let n: usize = match n.parse() {
        Ok(n) if n <= 64 << 20 => n,
        _ => {
            write!(out, "HTTP/1.0 400 Bad Request\r\nContent-Length: 0\r\n\r\n")?;
            return Ok(());
        }
    };
    write!(
        out,
        "HTTP/1.0 200 OK\r\nContent-Type: application/octet-stream\r\n\
         Content-Length: {n}\r\nX-Server: {name}\r\n\r\n"
    )?;
    let chunk: Vec<u8> = (0..65536).map(body_byte).collect();
    let mut sent = 0;
    while sent < n {
        let k = (n - sent).min(chunk.len());
        out.write_all(&chunk[..k])?;
        sent += k;
    }
    Ok(())
}

/// Byte `i` of a `/bytes/N` body (65536 is a multiple of 256, so chunks repeat it).
fn body_byte(i: usize) -> u8 {
    (i % 256) as u8 ^ 0x5a
}

fn main() {
    let mut args = std::env::args().skip(1);
    let (mut name, mut tcp, mut udp) = (None, Vec::new(), Vec::new());
    while let Some(a) = args.next() {
        let v = args.next().unwrap_or_else(|| usage());
        match a.as_str() {
            "--name" => name = Some(v),
            "--tcp" => tcp.push(v.parse::<SocketAddr>().unwrap_or_else(|_| usage())),
            "--udp" => udp.push(v.parse::<SocketAddr>().unwrap_or_else(|_| usage())),
            _ => usage(),
        }
    }
    let name = name.unwrap_or_else(|| usage());
    let mut handles = Vec::new();
    for addr in tcp {
        let listener = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind tcp {addr}: {e}"));
        let name = name.clone();
        handles.push(thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let name = name.clone();
                thread::spawn(move || {
                    let _ = serve_tcp(conn, &name);
                });
            }
        }));
    }
    for addr in udp {
        let sock = UdpSocket::bind(addr).unwrap_or_else(|e| panic!("bind udp {addr}: {e}"));
        let answer = format!("server={name}\n");
        handles.push(thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while let Ok((_, from)) = sock.recv_from(&mut buf) {
                let _ = sock.send_to(answer.as_bytes(), from);
            }
        }));
    }
    eprintln!("testsrv {name} listening");
    for h in handles {
        let _ = h.join();
    }
}
