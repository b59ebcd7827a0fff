//! The revocation list re-read (`control.rs`): a newer list ends the bindings it revokes; an
//! older, forged, garbled or missing one is refused and counted and the current list stays;
//! the watcher reads a file once per change; the operator's unbind.
use std::path::PathBuf;

use tokio::sync::{mpsc, oneshot};

use super::{bu, ip, key, operator, s1_cert, verifier, NOW, S1_REAL};
use crate::client::{
    control::{self, Ask, Event, ListOutcome, ListRead, Response},
    daemon::ClientStatus,
    RevocationList, Verifier,
};

/// A file of its own under the temporary directory, removed when dropped.
struct TempFile(PathBuf);

impl TempFile {
    fn new(name: &str) -> TempFile {
        TempFile(std::env::temp_dir().join(format!("anycast-client-{}-{name}", std::process::id())))
    }

    fn write(&self, text: &str) {
        // Written aside and renamed, as `pki revoke` writes it.
        let tmp = self.0.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &self.0).unwrap();
    }

    fn write_list(&self, number: u64, serials: Vec<u64>, signer: &anycast_common::pki::SigningKey) {
        let list = RevocationList::new(number, NOW, serials).unwrap();
        self.write(&format!("{}\n", crate::pki::hex(&list.sign(signer))));
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn bound() -> Verifier {
    let mut v = verifier();
    v.check(&bu(&s1_cert(), S1_REAL, 1).bytes(), ip(S1_REAL), NOW)
        .unwrap();
    assert!(v.bindings().contains_key(&key()));
    v
}

fn no_status(_: &Verifier) -> ClientStatus {
    unreachable!("no status asked")
}

#[test]
fn a_newer_list_read_from_the_file_ends_the_binding_it_revokes() {
    let f = TempFile::new("newer");
    let anchors = [operator().verifying_key()];
    let mut v = bound();
    f.write_list(1, vec![7], &operator());
    let ended = control::handle(
        Event::Revocations(control::read_list(&f.0, &anchors)),
        &mut v,
        no_status,
    );
    assert_eq!(ended, vec![], "serial 1 is not on list 1");
    assert_eq!(v.revocation_list().number, 1);
    // The operator revokes s1's certificate (serial 1): list 2.
    f.write_list(2, vec![1, 7], &operator());
    let ended = control::handle(
        Event::Revocations(control::read_list(&f.0, &anchors)),
        &mut v,
        no_status,
    );
    assert_eq!(
        ended,
        vec![key()],
        "the caller removes its tunnel map entry"
    );
    assert!(v.bindings().is_empty());
    assert!(v.revocation_list().is_revoked(1));
    let c = v.counters();
    assert_eq!(
        (c["revocation_list_taken"], c["ended_revoked"]),
        (2, 1),
        "{c:?}"
    );
    // The same list read again (a touched file, a SIGHUP): nothing changes or counts.
    assert_eq!(
        control::take_list(&mut v, control::read_list(&f.0, &anchors)),
        ListOutcome::Unchanged { number: 2 }
    );
    assert_eq!(v.counters()["revocation_list_taken"], 2);
    // And s1's binding is refused from now on.
    let mut again = bu(&s1_cert(), S1_REAL, 2);
    again.sent = NOW + 1;
    assert!(v.check(&again.bytes(), ip(S1_REAL), NOW + 1).is_err());
    assert_eq!(v.counters()["refused_certificate_revoked"], 1);
}

#[test]
fn older_forged_garbled_and_missing_lists_are_refused_counted_and_the_list_kept() {
    let f = TempFile::new("refused");
    let anchors = [operator().verifying_key()];
    let mut v = bound();
    f.write_list(5, vec![7], &operator());
    assert!(matches!(
        control::take_list(&mut v, control::read_list(&f.0, &anchors)),
        ListOutcome::Taken { number: 5, .. }
    ));
    let forger = anycast_common::pki::SigningKey::from_bytes(&[0x66; 32]);
    let too_big = "00".repeat(3 * 8 * anycast_common::pki::MAX_REVOKED);
    type Case<'a> = (&'static str, Box<dyn Fn() + 'a>);
    let cases: Vec<Case> = vec![
        ("older", Box::new(|| f.write_list(4, vec![1], &operator()))),
        (
            "bad_signature",
            Box::new(|| f.write_list(9, vec![1], &forger)),
        ),
        ("malformed", Box::new(|| f.write("not hex at all\n"))),
        ("malformed", Box::new(|| f.write("0011223344\n"))),
        ("malformed", Box::new(|| f.write(""))),
        ("malformed", Box::new(|| f.write(&too_big))),
        (
            "malformed",
            Box::new(|| {
                // A good list with a byte changed: the signature no longer covers it, or
                // the form is wrong; either way not taken.
                let list = RevocationList::new(9, NOW, vec![1]).unwrap();
                let mut b = list.sign(&operator());
                b.push(0);
                f.write(&crate::pki::hex(&b));
            }),
        ),
        (
            "missing",
            Box::new(|| {
                let _ = std::fs::remove_file(&f.0);
            }),
        ),
    ];
    for (reason, make) in &cases {
        make();
        let read = control::read_list(&f.0, &anchors);
        if *reason != "older" {
            assert!(
                matches!(read, ListRead::Refused { reason: r, .. } if r == *reason),
                "{reason}: {read:?}"
            );
        }
        let ended = control::handle(Event::Revocations(read), &mut v, no_status);
        assert_eq!(ended, vec![], "{reason}: nothing ended");
        assert_eq!(v.revocation_list().number, 5, "{reason}: the list stays");
        assert!(v.bindings().contains_key(&key()), "{reason}: still bound");
    }
    let c = v.counters();
    assert_eq!(c["revocation_list_refused_older"], 1, "{c:?}");
    assert_eq!(c["revocation_list_refused_bad_signature"], 1, "{c:?}");
    assert_eq!(c["revocation_list_refused_malformed"], 5, "{c:?}");
    assert_eq!(c["revocation_list_refused_missing"], 1, "{c:?}");
    assert_eq!(c["revocation_list_taken"], 1, "{c:?}");
    // A directory where the file was: unreadable.
    std::fs::create_dir(&f.0).unwrap();
    let read = control::read_list(&f.0, &anchors);
    std::fs::remove_dir(&f.0).unwrap();
    assert!(
        matches!(
            read,
            ListRead::Refused {
                reason: "unreadable",
                ..
            }
        ),
        "{read:?}"
    );
}

#[test]
fn the_operator_ends_a_binding_and_an_unbound_service_is_an_error() {
    let mut v = bound();
    let ask = |v: &mut Verifier, protocol, port| {
        let (answer, mut answered) = oneshot::channel();
        let ended = control::handle(
            Event::Control {
                ask: Ask::Unbind {
                    anycast: key().anycast,
                    protocol,
                    port,
                },
                answer,
            },
            v,
            no_status,
        );
        (ended, answered.try_recv().unwrap())
    };
    let (ended, r) = ask(&mut v, 17, 80);
    assert_eq!(ended, vec![], "udp/80 is not bound");
    assert!(matches!(r, Response::Error { .. }), "{r:?}");
    // The whole anycast address: every binding of it.
    let (ended, r) = ask(&mut v, 0, 0);
    assert_eq!(ended, vec![key()]);
    assert!(
        matches!(&r, Response::Unbound { ended } if ended[0].contains("(s1)")),
        "{r:?}"
    );
    assert!(v.bindings().is_empty());
    assert_eq!(v.counters()["ended_by_operator"], 1);
}

async fn next(rx: &mut mpsc::Receiver<Event>, within: std::time::Duration) -> Option<Event> {
    tokio::time::timeout(within, rx.recv()).await.ok().flatten()
}

/// The watcher reads the file once per change: a garbled file is one refusal, not one a
/// second; a good list replacing it is read at the next poll.
#[test]
fn the_watcher_reads_the_file_once_per_change() {
    let f = TempFile::new("watched");
    f.write("garbage\n");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async {
        let (tx, mut rx) = mpsc::channel(16);
        control::spawn_watcher(Some(f.0.clone()), vec![operator().verifying_key()], tx).unwrap();
        let first = next(&mut rx, control::POLL * 3).await;
        assert!(
            matches!(
                first,
                Some(Event::Revocations(ListRead::Refused {
                    reason: "malformed",
                    ..
                }))
            ),
            "the first look reads the file"
        );
        // Three more polls of the unchanged file: nothing.
        assert!(next(&mut rx, control::POLL * 3).await.is_none());
        let list = RevocationList::new(3, NOW, vec![1]).unwrap();
        f.write(&crate::pki::hex(&list.sign(&operator())));
        let read = next(&mut rx, control::POLL * 3).await;
        assert!(
            matches!(read, Some(Event::Revocations(ListRead::List(ref l))) if l.number == 3),
            "the changed file is read"
        );
        // Removed: one "missing".
        std::fs::remove_file(&f.0).unwrap();
        let read = next(&mut rx, control::POLL * 3).await;
        assert!(
            matches!(
                read,
                Some(Event::Revocations(ListRead::Refused {
                    reason: "missing",
                    ..
                }))
            ),
            "the removal is seen"
        );
        assert!(next(&mut rx, control::POLL * 2).await.is_none());
    });
}
