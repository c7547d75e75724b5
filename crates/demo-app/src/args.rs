//! Command line and environment → a typed `Command`, and the usage text.
//!
//! Every flag has an environment variable: `FLEET_DEMO_<FLAG IN UPPER SNAKE>`, except `--port`,
//! which reads `FLEET_APP_PORT` like any app the agent starts. A flag wins over its variable.
//! Parsing is a pure function of the arguments and an environment lookup, so tests need no
//! process environment.

use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use crate::faults::FaultKnobs;

/// What the process was asked to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// Serve HTTP until killed.
    Serve(Options),
    /// Print the inference for `input` and exit: the command-style functional probe.
    Infer { input: String, options: Options },
    /// Print usage and exit 0.
    Help,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Options {
    pub bind: IpAddr,
    pub port: u16,
    pub version: String,
    pub seed: u64,
    pub work_interval: Duration,
    pub leak_limit_mib: u64,
    pub only_on_device_type: Option<String>,
    /// `--data-dir`: application data with a schema version (see `data`).
    pub data_dir: Option<std::path::PathBuf>,
    /// `--migrate`: read schema 2 and migrate schema-1 data to it at start.
    pub migrate: bool,
    /// As given, before the `--only-on-device-type` gate.
    pub faults: FaultKnobs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Section {
    Server,
    Faults,
}

#[derive(Debug)]
struct Flag {
    name: &'static str,
    env: &'static str,
    /// The value's placeholder in the usage text; `None` for a switch.
    value: Option<&'static str>,
    section: Section,
    help: &'static str,
}

const fn flag(
    name: &'static str,
    env: &'static str,
    value: Option<&'static str>,
    section: Section,
    help: &'static str,
) -> Flag {
    Flag {
        name,
        env,
        value,
        section,
        help,
    }
}

use Section::{Faults, Server};

/// Every flag, in usage order. The single source for parsing, env names and `--help`.
// One line per flag reads as a table; rustfmt would spread each over seven lines.
#[rustfmt::skip]
const FLAGS: &[Flag] = &[
    flag("bind", "FLEET_DEMO_BIND", Some("ADDR"), Server, "IP address to listen on [default: 127.0.0.1]"),
    flag("port", "FLEET_APP_PORT", Some("PORT"), Server, "TCP port; 0 picks a free one [default: 8080]"),
    flag("version", "FLEET_DEMO_VERSION", Some("V"), Server, "version to report [default: the crate version]"),
    flag("work-interval-ms", "FLEET_DEMO_WORK_INTERVAL_MS", Some("MS"), Server, "pause between synthetic frames, >= 1 [default: 50]"),
    flag("seed", "FLEET_DEMO_SEED", Some("N"), Server, "seed of the error-injection PRNG [default: 1]"),
    flag("data-dir", "FLEET_DEMO_DATA_DIR", Some("DIR"), Server, "application data: DIR/schema (created at 1); newer data is refused at start"),
    flag("migrate", "FLEET_DEMO_MIGRATE", None, Server, "read data schema 2, migrating schema-1 data in --data-dir at start"),
    flag("only-on-device-type", "FLEET_DEMO_ONLY_ON_DEVICE_TYPE", Some("T"), Faults, "apply the fault knobs only when FLEET_DEVICE_TYPE is T"),
    flag("crash-at-start", "FLEET_DEMO_CRASH_AT_START", None, Faults, "exit with status 3 before binding"),
    flag("crash-after", "FLEET_DEMO_CRASH_AFTER", Some("SECS"), Faults, "exit with status 4 SECS (fractions ok) after binding"),
    flag("leak-mb-per-sec", "FLEET_DEMO_LEAK_MB_PER_SEC", Some("MIB"), Faults, "allocate and touch MIB MiB per second (fractions ok)"),
    flag("leak-limit-mb", "FLEET_DEMO_LEAK_LIMIT_MB", Some("MIB"), Faults, "stop leaking at MIB MiB [default: 512]"),
    flag("error-rate", "FLEET_DEMO_ERROR_RATE", Some("F"), Faults, "fraction (0..1) of frames and /work requests that fail"),
    flag("latency-ms", "FLEET_DEMO_LATENCY_MS", Some("MS"), Faults, "latency added to each frame, /work, /infer and `infer`"),
    flag("report-version", "FLEET_DEMO_REPORT_VERSION", Some("V"), Faults, "/health reports V instead of --version"),
    flag("unhealthy", "FLEET_DEMO_UNHEALTHY", None, Faults, "/health reports unhealthy (503), check self_test failing"),
    flag("hang", "FLEET_DEMO_HANG", None, Faults, "accept connections and never answer"),
    flag("wrong-output", "FLEET_DEMO_WRONG_OUTPUT", None, Faults, "/infer and `infer` give a different answer"),
    flag("ignore-sigterm", "FLEET_DEMO_IGNORE_SIGTERM", None, Faults, "ignore SIGTERM (only SIGKILL stops the process)"),
];

const DEFAULT_PORT: u16 = 8080;
const DEFAULT_WORK_INTERVAL: Duration = Duration::from_millis(50);
const DEFAULT_SEED: u64 = 1;
const DEFAULT_LEAK_LIMIT_MIB: u64 = 512;

/// A usage error; `main` prints it and exits 2.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArgError {
    UnknownFlag(String),
    MissingValue(&'static str),
    UnexpectedValue {
        flag: &'static str,
        value: String,
    },
    Invalid {
        source: String,
        value: String,
        expected: &'static str,
    },
    UnexpectedArgument(String),
    MissingInferInput,
}

impl fmt::Display for ArgError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ArgError::UnknownFlag(arg) => write!(f, "unknown flag {arg}"),
            ArgError::MissingValue(flag) => write!(f, "flag --{flag} needs a value"),
            ArgError::UnexpectedValue { flag, value } => {
                write!(f, "flag --{flag} takes no value (got {value:?})")
            }
            ArgError::Invalid {
                source,
                value,
                expected,
            } => {
                write!(
                    f,
                    "invalid value {value:?} for {source}: expected {expected}"
                )
            }
            ArgError::UnexpectedArgument(arg) => {
                write!(
                    f,
                    "unexpected argument {arg:?} (the only subcommand is `infer TEXT`)"
                )
            }
            ArgError::MissingInferInput => write!(f, "`infer` needs the TEXT to infer on"),
        }
    }
}

/// Parses `args` (without the program name). `env` looks up an environment variable.
///
/// `infer` takes the next argument verbatim as its TEXT, even when it starts with `-`.
pub fn parse(args: &[String], env: impl Fn(&str) -> Option<String>) -> Result<Command, ArgError> {
    let mut given: Vec<Option<String>> = vec![None; FLAGS.len()];
    let mut infer: Option<Option<String>> = None;
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        if infer == Some(None) {
            infer = Some(Some(arg.clone()));
            continue;
        }
        if arg == "--help" || arg == "-h" {
            return Ok(Command::Help);
        }
        if let Some(body) = arg.strip_prefix("--") {
            let (name, inline) = match body.split_once('=') {
                Some((name, value)) => (name, Some(value.to_string())),
                None => (body, None),
            };
            let index = FLAGS
                .iter()
                .position(|f| f.name == name)
                .ok_or_else(|| ArgError::UnknownFlag(format!("--{name}")))?;
            let flag = &FLAGS[index];
            let value = match (flag.value, inline) {
                (None, None) => "true".to_string(),
                (None, Some(value)) => {
                    return Err(ArgError::UnexpectedValue {
                        flag: flag.name,
                        value,
                    });
                }
                (Some(_), Some(value)) => value,
                (Some(_), None) => args
                    .next()
                    .cloned()
                    .ok_or(ArgError::MissingValue(flag.name))?,
            };
            given[index] = Some(value);
        } else if arg.starts_with('-') && arg != "-" {
            return Err(ArgError::UnknownFlag(arg.clone()));
        } else if arg == "infer" && infer.is_none() {
            infer = Some(None);
        } else {
            return Err(ArgError::UnexpectedArgument(arg.clone()));
        }
    }
    let options = Sources { given, env }.options()?;
    match infer {
        None => Ok(Command::Serve(options)),
        Some(None) => Err(ArgError::MissingInferInput),
        Some(Some(input)) => Ok(Command::Infer { input, options }),
    }
}

/// Where each flag's raw value comes from: the command line, else the environment.
struct Sources<E> {
    given: Vec<Option<String>>,
    env: E,
}

impl<E: Fn(&str) -> Option<String>> Sources<E> {
    fn options(&self) -> Result<Options, ArgError> {
        let faults = FaultKnobs {
            crash_at_start: self.switch("crash-at-start")?,
            crash_after: self.get("crash-after", seconds)?,
            leak_mib_per_sec: self.get("leak-mb-per-sec", non_negative)?.unwrap_or(0.0),
            error_rate: self.get("error-rate", fraction)?.unwrap_or(0.0),
            latency: self.get("latency-ms", millis)?.unwrap_or(Duration::ZERO),
            report_version: self.get("report-version", non_empty)?,
            unhealthy: self.switch("unhealthy")?,
            hang: self.switch("hang")?,
            wrong_output: self.switch("wrong-output")?,
            ignore_sigterm: self.switch("ignore-sigterm")?,
        };
        Ok(Options {
            bind: self
                .get("bind", ip)?
                .unwrap_or(IpAddr::from([127, 0, 0, 1])),
            port: self.get("port", port)?.unwrap_or(DEFAULT_PORT),
            version: self
                .get("version", non_empty)?
                .unwrap_or_else(|| env!("CARGO_PKG_VERSION").to_string()),
            seed: self.get("seed", unsigned)?.unwrap_or(DEFAULT_SEED),
            work_interval: self
                .get("work-interval-ms", positive_millis)?
                .unwrap_or(DEFAULT_WORK_INTERVAL),
            leak_limit_mib: self
                .get("leak-limit-mb", unsigned)?
                .unwrap_or(DEFAULT_LEAK_LIMIT_MIB),
            only_on_device_type: self.get("only-on-device-type", non_empty)?,
            data_dir: self
                .get("data-dir", non_empty)?
                .map(std::path::PathBuf::from),
            migrate: self.switch("migrate")?,
            faults,
        })
    }

    /// The typed value of flag `name`, or `None` when neither the flag nor its variable is set.
    fn get<T>(
        &self,
        name: &str,
        convert: fn(&str) -> Result<T, &'static str>,
    ) -> Result<Option<T>, ArgError> {
        let index = FLAGS.iter().position(|f| f.name == name).expect(
            "options() only names flags listed in FLAGS; every parse test reaches them all",
        );
        let flag = &FLAGS[index];
        let (value, source) = match (&self.given[index], (self.env)(flag.env)) {
            (Some(value), _) => (value.clone(), format!("--{}", flag.name)),
            (None, Some(value)) => (value, flag.env.to_string()),
            (None, None) => return Ok(None),
        };
        convert(&value)
            .map(Some)
            .map_err(|expected| ArgError::Invalid {
                source,
                value,
                expected,
            })
    }

    fn switch(&self, name: &str) -> Result<bool, ArgError> {
        Ok(self.get(name, boolean)?.unwrap_or(false))
    }
}

fn boolean(s: &str) -> Result<bool, &'static str> {
    match s.to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" | "" => Ok(false),
        _ => Err("1/true/yes/on or 0/false/no/off"),
    }
}

fn ip(s: &str) -> Result<IpAddr, &'static str> {
    s.parse()
        .map_err(|_| "an IP address such as 127.0.0.1 or ::1")
}

fn port(s: &str) -> Result<u16, &'static str> {
    s.parse().map_err(|_| "a port number 0..=65535")
}

fn unsigned(s: &str) -> Result<u64, &'static str> {
    s.parse().map_err(|_| "a non-negative integer")
}

fn millis(s: &str) -> Result<Duration, &'static str> {
    s.parse()
        .map(Duration::from_millis)
        .map_err(|_| "a whole number of milliseconds")
}

fn positive_millis(s: &str) -> Result<Duration, &'static str> {
    match s.parse::<u64>() {
        Ok(ms) if ms >= 1 => Ok(Duration::from_millis(ms)),
        _ => Err("a whole number of milliseconds, at least 1"),
    }
}

fn non_negative(s: &str) -> Result<f64, &'static str> {
    match s.parse::<f64>() {
        Ok(x) if x.is_finite() && x >= 0.0 => Ok(x),
        _ => Err("a non-negative number"),
    }
}

fn seconds(s: &str) -> Result<Duration, &'static str> {
    non_negative(s)
        .ok()
        .and_then(|x| Duration::try_from_secs_f64(x).ok())
        .ok_or("a non-negative number of seconds")
}

fn fraction(s: &str) -> Result<f64, &'static str> {
    match s.parse::<f64>() {
        Ok(x) if (0.0..=1.0).contains(&x) => Ok(x),
        _ => Err("a fraction between 0 and 1"),
    }
}

fn non_empty(s: &str) -> Result<String, &'static str> {
    if s.is_empty() {
        Err("a non-empty string")
    } else {
        Ok(s.to_string())
    }
}

/// The `--help` text, generated from `FLAGS` so it cannot miss one.
pub fn usage() -> String {
    let mut out = String::from(
        "fleet-demo-app: the sample application fleet rollouts deploy\n\
         \n\
         Usage:\n  \
         fleet-demo-app [FLAGS]              serve /health, /work and /infer until killed\n  \
         fleet-demo-app [FLAGS] infer TEXT   print the inference for TEXT and exit\n\
         \n\
         Each flag can also be set by the environment variable shown; the flag wins.\n\
         Switches read 1/true/yes/on or 0/false/no/off from the environment.\n",
    );
    for (section, title) in [(Server, "Server"), (Faults, "Fault knobs")] {
        out.push_str(&format!("\n{title}:\n"));
        for f in FLAGS.iter().filter(|f| f.section == section) {
            let left = match f.value {
                Some(v) => format!("--{} {v}", f.name),
                None => format!("--{}", f.name),
            };
            out.push_str(&format!(
                "  {left:<26} {}\n  {:<26} env {}\n",
                f.help, "", f.env
            ));
        }
    }
    out.push_str(
        "\n  -h, --help                 print this help\n\
         \n\
         SIGTERM ends the process at once (default disposition) unless --ignore-sigterm.\n\
         Exit status: 0 ok, 1 runtime failure, 2 bad usage, 3 --crash-at-start, 4 --crash-after.\n",
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Arguments, environment, and what they should give.
    type Case<T> = (
        &'static [&'static str],
        &'static [(&'static str, &'static str)],
        T,
    );

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    fn check(list: &[&str], env: &[(&str, &str)]) -> Result<Command, ArgError> {
        parse(&args(list), |key| {
            env.iter()
                .find(|(k, _)| *k == key)
                .map(|(_, v)| v.to_string())
        })
    }

    fn serve(list: &[&str], env: &[(&str, &str)]) -> Options {
        match check(list, env) {
            Ok(Command::Serve(options)) => options,
            other => panic!("{list:?} {env:?}: expected serve, got {other:?}"),
        }
    }

    fn defaults() -> Options {
        serve(&[], &[])
    }

    #[test]
    fn defaults_are_healthy() {
        let o = defaults();
        assert_eq!(o.bind, IpAddr::from([127, 0, 0, 1]));
        assert_eq!(o.port, 8080);
        assert_eq!(o.version, env!("CARGO_PKG_VERSION"));
        assert_eq!(o.work_interval, Duration::from_millis(50));
        assert_eq!(o.leak_limit_mib, 512);
        assert_eq!(o.only_on_device_type, None);
        assert_eq!((o.data_dir.as_ref(), o.migrate), (None, false));
        assert_eq!(o.faults, FaultKnobs::default());
        let d = serve(&["--data-dir", "/var/lib/app", "--migrate"], &[]);
        assert_eq!((d.data_dir, d.migrate), (Some("/var/lib/app".into()), true));
        let e = serve(
            &[],
            &[("FLEET_DEMO_DATA_DIR", "/d"), ("FLEET_DEMO_MIGRATE", "1")],
        );
        assert_eq!((e.data_dir, e.migrate), (Some("/d".into()), true));
    }

    /// The defaults with one change.
    fn options(change: impl FnOnce(&mut Options)) -> Options {
        let mut o = defaults();
        change(&mut o);
        o
    }

    /// No faults but one.
    fn knobs(change: impl FnOnce(&mut FaultKnobs)) -> FaultKnobs {
        let mut k = FaultKnobs::default();
        change(&mut k);
        k
    }

    #[test]
    fn flags_and_env_set_options() {
        let ms = Duration::from_millis;
        #[rustfmt::skip]
        let cases: Vec<Case<Options>> = vec![
            (&["--port", "0"], &[], options(|o| o.port = 0)),
            (&["--port=9000"], &[], options(|o| o.port = 9000)),
            (&[], &[("FLEET_APP_PORT", "9001")], options(|o| o.port = 9001)),
            (&["--bind", "::1"], &[], options(|o| o.bind = "::1".parse().unwrap())),
            (&["--version", "2.0.0"], &[], options(|o| o.version = "2.0.0".into())),
            (&["--seed", "42"], &[], options(|o| o.seed = 42)),
            (&["--work-interval-ms", "5"], &[], options(|o| o.work_interval = ms(5))),
            (&["--leak-limit-mb", "64"], &[], options(|o| o.leak_limit_mib = 64)),
            (&["--only-on-device-type", "t"], &[], options(|o| o.only_on_device_type = Some("t".into()))),
        ];
        for (list, env, want) in cases {
            assert_eq!(serve(list, env), want, "{list:?} {env:?}");
        }
    }

    #[test]
    fn fault_knobs_from_flags_and_env() {
        let ms = Duration::from_millis;
        #[rustfmt::skip]
        let cases: Vec<Case<FaultKnobs>> = vec![
            (&["--crash-at-start"], &[], knobs(|k| k.crash_at_start = true)),
            (&[], &[("FLEET_DEMO_CRASH_AT_START", "1")], knobs(|k| k.crash_at_start = true)),
            (&[], &[("FLEET_DEMO_CRASH_AT_START", "off")], knobs(|_| {})),
            (&["--crash-after", "1.5"], &[], knobs(|k| k.crash_after = Some(ms(1500)))),
            (&[], &[("FLEET_DEMO_CRASH_AFTER", "5")], knobs(|k| k.crash_after = Some(ms(5000)))),
            (&["--leak-mb-per-sec", "0.5"], &[], knobs(|k| k.leak_mib_per_sec = 0.5)),
            (&["--error-rate", "0.25"], &[], knobs(|k| k.error_rate = 0.25)),
            (&["--latency-ms", "40"], &[], knobs(|k| k.latency = ms(40))),
            (&["--report-version", "9"], &[], knobs(|k| k.report_version = Some("9".into()))),
            (&["--unhealthy"], &[], knobs(|k| k.unhealthy = true)),
            (&["--hang"], &[], knobs(|k| k.hang = true)),
            (&["--wrong-output"], &[], knobs(|k| k.wrong_output = true)),
            (&["--ignore-sigterm"], &[], knobs(|k| k.ignore_sigterm = true)),
            // The flag wins over the variable.
            (&["--error-rate", "0"], &[("FLEET_DEMO_ERROR_RATE", "1")], knobs(|_| {})),
            // A later flag wins over an earlier one.
            (&["--error-rate", "0.1", "--error-rate=0.2"], &[], knobs(|k| k.error_rate = 0.2)),
        ];
        for (list, env, want) in cases {
            assert_eq!(serve(list, env).faults, want, "{list:?} {env:?}");
        }
    }

    #[test]
    fn bad_input_names_the_flag_or_variable_and_value() {
        // Arguments, environment, and what the message must mention.
        #[rustfmt::skip]
        let cases: Vec<Case<&[&str]>> = vec![
            (&["--bogus"], &[], &["unknown flag --bogus"]),
            (&["--bogus=1"], &[], &["unknown flag --bogus"]),
            (&["-x"], &[], &["unknown flag -x"]),
            (&["--port"], &[], &["--port", "needs a value"]),
            (&["--port", "99999"], &[], &["--port", "\"99999\""]),
            (&["--error-rate", "abc"], &[], &["--error-rate", "\"abc\""]),
            (&["--error-rate", "1.5"], &[], &["--error-rate", "\"1.5\""]),
            (&["--error-rate", "NaN"], &[], &["--error-rate", "\"NaN\""]),
            (&["--crash-after", "-1"], &[], &["--crash-after", "\"-1\""]),
            (&["--crash-after", "inf"], &[], &["--crash-after", "\"inf\""]),
            (&["--leak-mb-per-sec", "x"], &[], &["--leak-mb-per-sec", "\"x\""]),
            (&["--work-interval-ms", "0"], &[], &["--work-interval-ms", "\"0\""]),
            (&["--bind", "localhost"], &[], &["--bind", "\"localhost\""]),
            (&["--version", ""], &[], &["--version", "\"\""]),
            (&["--hang=yes"], &[], &["--hang", "takes no value"]),
            (&[], &[("FLEET_DEMO_ERROR_RATE", "2")], &["FLEET_DEMO_ERROR_RATE", "\"2\""]),
            (&[], &[("FLEET_DEMO_HANG", "maybe")], &["FLEET_DEMO_HANG", "\"maybe\""]),
            (&[], &[("FLEET_APP_PORT", "http")], &["FLEET_APP_PORT", "\"http\""]),
            (&["serve"], &[], &["unexpected argument \"serve\""]),
            (&["infer", "a", "b"], &[], &["unexpected argument \"b\""]),
            (&["infer"], &[], &["`infer` needs the TEXT"]),
        ];
        for (list, env, needles) in cases {
            let err = match check(list, env) {
                Err(e) => e.to_string(),
                Ok(c) => panic!("{list:?} {env:?}: expected an error, got {c:?}"),
            };
            for needle in needles {
                assert!(
                    err.contains(needle),
                    "{list:?} {env:?}: {err:?} lacks {needle:?}"
                );
            }
        }
    }

    #[test]
    fn infer_takes_the_next_argument_verbatim() {
        let cases: Vec<(&[&str], &str, bool)> = vec![
            (&["infer", "hello world"], "hello world", false),
            (&["infer", "--wrong-output"], "--wrong-output", false),
            (&["--wrong-output", "infer", "x"], "x", true),
            (&["infer", "x", "--wrong-output"], "x", true),
            (&["infer", ""], "", false),
        ];
        for (list, want_input, want_wrong) in cases {
            match check(list, &[]) {
                Ok(Command::Infer { input, options }) => {
                    assert_eq!(input, want_input, "{list:?}");
                    assert_eq!(options.faults.wrong_output, want_wrong, "{list:?}");
                }
                other => panic!("{list:?}: expected infer, got {other:?}"),
            }
        }
    }

    #[test]
    fn help_wins() {
        assert_eq!(check(&["--port", "1", "--help"], &[]), Ok(Command::Help));
        assert_eq!(check(&["-h"], &[]), Ok(Command::Help));
    }

    #[test]
    fn env_names_follow_the_rule() {
        for f in FLAGS {
            let want = if f.name == "port" {
                "FLEET_APP_PORT".to_string()
            } else {
                format!("FLEET_DEMO_{}", f.name.to_uppercase().replace('-', "_"))
            };
            assert_eq!(f.env, want, "flag --{}", f.name);
        }
    }

    #[test]
    fn usage_lists_every_flag_and_variable() {
        let text = usage();
        for f in FLAGS {
            assert!(
                text.contains(&format!("--{}", f.name)),
                "usage lacks --{}",
                f.name
            );
            assert!(text.contains(f.env), "usage lacks {}", f.env);
        }
    }
}
