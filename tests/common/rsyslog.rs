//! A real rsyslogd for syslog tests: a plain foreground process (never the
//! system service) on free loopback ports, with its own config, pid file
//! and work directory, writing each message it receives as one JSON line
//! (parsed by mmpstrucdata) to a file the test reads.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::tls::TlsFiles;

pub struct Rsyslog {
    pub dir: PathBuf,
    pub out: PathBuf,
    pub udp_port: u16,
    pub tcp_port: u16,
    pub tls_port: u16,
    /// TLS with client certificates required (x509/certvalid).
    pub mtls_port: u16,
    conf: PathBuf,
    pid: PathBuf,
    child: Option<Child>,
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let p = l.local_addr().unwrap().port();
    // Make sure UDP is free on the same number too.
    let _u = std::net::UdpSocket::bind(("127.0.0.1", p)).ok();
    p
}

impl Rsyslog {
    /// Start rsyslogd in `dir`; with `tls`, TLS inputs as well.
    pub fn start(dir: &Path, tls: Option<&TlsFiles>) -> Rsyslog {
        assert!(
            Command::new("rsyslogd").arg("-v").output().is_ok(),
            "rsyslogd is not installed: apt-get install -y rsyslog rsyslog-gnutls (as .ci/run does)"
        );
        let work = dir.join("rsyslog-work");
        std::fs::create_dir_all(&work).unwrap();
        let mut r = Rsyslog {
            dir: dir.to_path_buf(),
            out: dir.join("rsyslog-out.jsonl"),
            udp_port: free_port(),
            tcp_port: free_port(),
            tls_port: free_port(),
            mtls_port: free_port(),
            conf: dir.join("rsyslog.conf"),
            pid: dir.join("rsyslog.pid"),
            child: None,
        };
        let tls_global = match tls {
            Some(t) => format!(
                "defaultNetstreamDriverCAFile=\"{}\" defaultNetstreamDriverCertFile=\"{}\" defaultNetstreamDriverKeyFile=\"{}\"",
                t.ca.display(),
                t.cert.display(),
                t.key.display()
            ),
            None => String::new(),
        };
        let tls_inputs = if tls.is_some() {
            format!(
                "input(type=\"imtcp\" port=\"{}\" ruleset=\"r\" streamDriver.name=\"gtls\" streamDriver.mode=\"1\" streamDriver.authMode=\"anon\")\n\
                 input(type=\"imtcp\" port=\"{}\" ruleset=\"r\" streamDriver.name=\"gtls\" streamDriver.mode=\"1\" streamDriver.authMode=\"x509/certvalid\")\n",
                r.tls_port, r.mtls_port
            )
        } else {
            String::new()
        };
        let conf = format!(
            r#"global(maxMessageSize="64k" workDirectory="{work}" processInternalMessages="on" parser.escapeControlCharactersOnReceive="off" {tls_global})
module(load="imudp")
module(load="imtcp" maxSessions="200")
module(load="mmpstrucdata")
template(name="j" type="list" option.jsonf="on") {{
  property(outname="pri" name="pri" format="jsonf")
  property(outname="protocol-version" name="protocol-version" format="jsonf")
  property(outname="timereported" name="timereported" dateFormat="rfc3339" format="jsonf")
  property(outname="hostname" name="hostname" format="jsonf")
  property(outname="app-name" name="app-name" format="jsonf")
  property(outname="procid" name="procid" format="jsonf")
  property(outname="msgid" name="msgid" format="jsonf")
  property(outname="structured-data" name="structured-data" format="jsonf")
  property(outname="sd" name="$!rfc5424-sd" format="jsonf")
  property(outname="msg" name="msg" format="jsonf")
}}
ruleset(name="r") {{
  action(type="mmpstrucdata" sd_name.lowercase="off")
  action(type="omfile" file="{out}" template="j")
}}
input(type="imudp" port="{udp}" address="127.0.0.1" ruleset="r" rcvbufSize="16m")
input(type="imtcp" port="{tcp}" address="127.0.0.1" ruleset="r" supportOctetCountedFraming="on")
{tls_inputs}"#,
            work = work.display(),
            out = r.out.display(),
            udp = r.udp_port,
            tcp = r.tcp_port,
        );
        std::fs::write(&r.conf, conf).unwrap();
        r.spawn();
        r
    }

    fn spawn(&mut self) {
        let _ = std::fs::remove_file(&self.pid);
        let child = Command::new("rsyslogd")
            .args(["-n", "-f"])
            .arg(&self.conf)
            .arg("-i")
            .arg(&self.pid)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start rsyslogd");
        self.child = Some(child);
        // Ready when the plain TCP input accepts connections (TLS inputs open with it, a little later).
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", self.tcp_port)).is_ok() {
                std::thread::sleep(Duration::from_millis(300));
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("rsyslogd did not start; config {}", self.conf.display());
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Every message written so far, parsed.
    pub fn messages(&self) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(&self.out).unwrap_or_default();
        // rsyslog may be writing right now: only whole lines count (those must all be JSON).
        let complete = text.rfind('\n').map_or("", |i| &text[..=i]);
        complete
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                serde_json::from_str(l).unwrap_or_else(|e| panic!("rsyslog wrote a line that is not JSON ({e}): {l}"))
            })
            .collect()
    }
}

impl Drop for Rsyslog {
    fn drop(&mut self) {
        self.stop();
    }
}
