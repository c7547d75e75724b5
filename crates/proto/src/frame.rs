//! Framing: how a message becomes bytes on a topic and back.
//!
//! Device traffic is postcard behind one version byte: `[VERSION, postcard…]`. The operator
//! topics are JSON so that `mosquitto_sub` and scripts can read them; a command may also arrive
//! as a postcard frame (first byte [`VERSION`], which can never start a JSON document).
//!
//! Every kind has a size limit, checked *before* decoding, so a hostile or broken peer cannot
//! make a process allocate or parse more than the limit.
//!
//! Design: postcard is not self-describing. Within one version, fields and variants are only
//! ever appended; a reader ignores bytes after the message so that an older reader still decodes
//! a newer writer's frame whose top-level struct grew, and a field appended to a top-level struct
//! is read with [`appended`] so that a newer reader still decodes an older writer's frame (the
//! field takes its default). Anything else bumps [`VERSION`].

use std::fmt;

use serde::Serialize;
use serde::de::DeserializeOwned;

/// The protocol version carried in the first byte of every postcard frame.
pub const VERSION: u8 = 1;

/// The kinds of message, one per topic in the topic table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    Desired,
    State,
    Heartbeat,
    Event,
    Online,
    Command,
    Reply,
    RolloutState,
    /// `fleet/v1/trust`: the chain of signed release-key rotations.
    Trust,
}

/// How a kind is written on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    /// `[VERSION]` followed by postcard.
    Postcard,
    /// A JSON document.
    Json,
}

impl Kind {
    pub const ALL: [Kind; 9] = [
        Kind::Desired,
        Kind::State,
        Kind::Heartbeat,
        Kind::Event,
        Kind::Online,
        Kind::Command,
        Kind::Reply,
        Kind::RolloutState,
        Kind::Trust,
    ];

    /// The largest frame accepted for this kind, in bytes.
    ///
    /// Sized from what the message can legitimately hold, with room to grow: a desired state
    /// carries a signed release (a few KiB even with every architecture listed); a reply may list
    /// a large fleet's devices.
    pub const fn max_size(self) -> usize {
        match self {
            Kind::Desired => 64 * 1024,
            Kind::State => 16 * 1024,
            Kind::Heartbeat => 2 * 1024,
            Kind::Event => 4 * 1024,
            Kind::Online => 512,
            Kind::Command => 256 * 1024,
            Kind::Reply => 8 * 1024 * 1024,
            Kind::RolloutState => 64 * 1024,
            // A rotation is a few hundred bytes; the chain holds at most `trust::MAX_CHAIN`.
            Kind::Trust => 16 * 1024,
        }
    }

    pub const fn encoding(self) -> Encoding {
        match self {
            Kind::Command | Kind::Reply | Kind::RolloutState => Encoding::Json,
            _ => Encoding::Postcard,
        }
    }

    /// A name a person reads in an error message.
    pub const fn name(self) -> &'static str {
        match self {
            Kind::Desired => "desired state",
            Kind::State => "reported state",
            Kind::Heartbeat => "heartbeat",
            Kind::Event => "event",
            Kind::Online => "online status",
            Kind::Command => "operator command",
            Kind::Reply => "operator reply",
            Kind::RolloutState => "rollout state",
            Kind::Trust => "key rotations",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Reads a field appended to the end of a top-level message: `#[serde(default, deserialize_with
/// = "fleet_proto::frame::appended")]`. An older writer's postcard frame ends before the field,
/// which then takes its default instead of failing the whole frame as truncated.
///
/// Design: postcard cannot tell "the frame ended" from "the bytes are not a `T`", so both read as
/// the default. An appended field must therefore be one whose default is the safe reading (the
/// behaviour before the field existed), and only fields that end an older writer's frame may use
/// this: the last fields of a top-level message, or of a struct that is its last field and in
/// no other message (`Heartbeat.app`). Anywhere else it would swallow the next field's bytes.
pub fn appended<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::Deserialize<'de> + Default,
{
    Ok(T::deserialize(deserializer).unwrap_or_default())
}

/// A message that travels on a fleet topic.
pub trait Message: Serialize + DeserializeOwned {
    const KIND: Kind;
}

/// Why a frame was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameProblem {
    #[error("the frame is empty")]
    Empty,
    #[error("{len} bytes is over the {max}-byte limit for this kind")]
    TooLarge { len: usize, max: usize },
    #[error(
        "protocol version {got} is not supported (this build speaks version {VERSION}); upgrade the older side"
    )]
    UnsupportedVersion { got: u8 },
    #[error("the frame ends early (truncated)")]
    Truncated,
    #[error("malformed: {0}")]
    Malformed(String),
}

/// A frame that could not be decoded: which kind, on which topic, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct DecodeError {
    pub kind: Kind,
    /// The topic the frame arrived on, when the caller knows it.
    pub topic: Option<String>,
    pub problem: FrameProblem,
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cannot decode {} frame", self.kind)?;
        if let Some(topic) = &self.topic {
            write!(f, " on {topic}")?;
        }
        write!(f, ": {}", self.problem)
    }
}

impl DecodeError {
    /// Names the topic the frame arrived on.
    pub fn on(mut self, topic: impl fmt::Display) -> Self {
        self.topic = Some(topic.to_string());
        self
    }
}

/// Encodes a message in its kind's wire encoding.
pub fn encode<M: Message>(msg: &M) -> Vec<u8> {
    match M::KIND.encoding() {
        Encoding::Postcard => encode_postcard(msg),
        Encoding::Json => serde_json::to_vec(msg).expect("fleet messages have string map keys"),
    }
}

/// Encodes a message as a postcard frame, whatever its kind's usual encoding (commands may be
/// sent either way).
pub fn encode_postcard<M: Message>(msg: &M) -> Vec<u8> {
    let mut out = vec![VERSION];
    postcard::to_io(msg, &mut out).expect("fleet messages have no unsized sequences");
    out
}

/// Decodes a frame of kind `M::KIND`, checking its size before anything else.
pub fn decode<M: Message>(frame: &[u8]) -> Result<M, DecodeError> {
    let fail = |problem| DecodeError {
        kind: M::KIND,
        topic: None,
        problem,
    };
    let max = M::KIND.max_size();
    if frame.len() > max {
        return Err(fail(FrameProblem::TooLarge {
            len: frame.len(),
            max,
        }));
    }
    let Some(&first) = frame.first() else {
        return Err(fail(FrameProblem::Empty));
    };
    // A JSON kind may still arrive as postcard; JSON never starts with a control byte.
    let postcard = match M::KIND.encoding() {
        Encoding::Postcard => true,
        Encoding::Json => first < 0x20,
    };
    if postcard {
        if first != VERSION {
            return Err(fail(FrameProblem::UnsupportedVersion { got: first }));
        }
        postcard::take_from_bytes::<M>(&frame[1..])
            .map(|(msg, _newer_fields)| msg)
            .map_err(|e| {
                fail(match e {
                    postcard::Error::DeserializeUnexpectedEnd => FrameProblem::Truncated,
                    other => FrameProblem::Malformed(other.to_string()),
                })
            })
    } else {
        serde_json::from_slice(frame).map_err(|e| {
            fail(if e.is_eof() {
                FrameProblem::Truncated
            } else {
                FrameProblem::Malformed(e.to_string())
            })
        })
    }
}
