//! Topic names under `fleet/v1/`: builders, parsers and subscription filters.
//!
//! The device id sits right after the versioned prefix (`fleet/v1/devices/{id}/…`) so that a
//! broker ACL can grant a device exactly its own subtree with one pattern.

use std::fmt;
use std::str::FromStr;

use crate::frame::Kind;
use crate::ids::{DeviceId, IdError, RequestId, RolloutId};

/// Every topic starts with this; the `v1` changes only with an incompatible protocol.
pub const PREFIX: &str = "fleet/v1";

/// A parsed fleet topic.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Topic {
    /// `devices/{id}/desired`: coordinator → agent, retained.
    Desired(DeviceId),
    /// `devices/{id}/state`: agent → coordinator, retained.
    State(DeviceId),
    /// `devices/{id}/heartbeat`: agent → coordinator.
    Heartbeat(DeviceId),
    /// `devices/{id}/events`: agent → coordinator.
    Events(DeviceId),
    /// `devices/{id}/online`: agent (and its last will), retained.
    Online(DeviceId),
    /// `rollouts/commands`: operator → coordinator.
    Commands,
    /// `rollouts/replies/{request_id}`: coordinator → operator.
    Reply(RequestId),
    /// `rollouts/{rollout_id}/state`: coordinator → anyone, retained.
    RolloutState(RolloutId),
    /// `trust`: coordinator → every agent, retained: the chain of signed key rotations.
    Trust,
}

/// Why a topic string is not a fleet topic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    #[error("topic {topic:?} is not under {PREFIX}/")]
    WrongPrefix { topic: String },
    #[error("topic {topic:?} is not a fleet topic: unknown layout")]
    Unknown { topic: String },
    #[error("topic {topic:?}: {source}")]
    BadId {
        topic: String,
        #[source]
        source: IdError,
    },
}

impl Topic {
    /// The message kind carried on this topic, which decides its size limit and encoding.
    pub fn kind(&self) -> Kind {
        match self {
            Topic::Desired(_) => Kind::Desired,
            Topic::State(_) => Kind::State,
            Topic::Heartbeat(_) => Kind::Heartbeat,
            Topic::Events(_) => Kind::Event,
            Topic::Online(_) => Kind::Online,
            Topic::Commands => Kind::Command,
            Topic::Reply(_) => Kind::Reply,
            Topic::RolloutState(_) => Kind::RolloutState,
            Topic::Trust => Kind::Trust,
        }
    }

    /// The device a per-device topic belongs to.
    pub fn device(&self) -> Option<&DeviceId> {
        match self {
            Topic::Desired(id)
            | Topic::State(id)
            | Topic::Heartbeat(id)
            | Topic::Events(id)
            | Topic::Online(id) => Some(id),
            Topic::Commands | Topic::Reply(_) | Topic::RolloutState(_) | Topic::Trust => None,
        }
    }

    /// The subscription filter matching this kind of topic for every device, rollout or request,
    /// e.g. `fleet/v1/devices/+/heartbeat`.
    pub fn filter(kind: Kind) -> String {
        match kind {
            Kind::Desired => format!("{PREFIX}/devices/+/desired"),
            Kind::State => format!("{PREFIX}/devices/+/state"),
            Kind::Heartbeat => format!("{PREFIX}/devices/+/heartbeat"),
            Kind::Event => format!("{PREFIX}/devices/+/events"),
            Kind::Online => format!("{PREFIX}/devices/+/online"),
            Kind::Command => format!("{PREFIX}/rollouts/commands"),
            Kind::Reply => format!("{PREFIX}/rollouts/replies/+"),
            Kind::RolloutState => format!("{PREFIX}/rollouts/+/state"),
            Kind::Trust => format!("{PREFIX}/trust"),
        }
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Topic::Desired(id) => write!(f, "{PREFIX}/devices/{id}/desired"),
            Topic::State(id) => write!(f, "{PREFIX}/devices/{id}/state"),
            Topic::Heartbeat(id) => write!(f, "{PREFIX}/devices/{id}/heartbeat"),
            Topic::Events(id) => write!(f, "{PREFIX}/devices/{id}/events"),
            Topic::Online(id) => write!(f, "{PREFIX}/devices/{id}/online"),
            Topic::Commands => write!(f, "{PREFIX}/rollouts/commands"),
            Topic::Reply(id) => write!(f, "{PREFIX}/rollouts/replies/{id}"),
            Topic::RolloutState(id) => write!(f, "{PREFIX}/rollouts/{id}/state"),
            Topic::Trust => write!(f, "{PREFIX}/trust"),
        }
    }
}

impl FromStr for Topic {
    type Err = TopicError;

    fn from_str(topic: &str) -> Result<Self, TopicError> {
        let rest = topic
            .strip_prefix(PREFIX)
            .and_then(|r| r.strip_prefix('/'))
            .ok_or_else(|| TopicError::WrongPrefix {
                topic: topic.to_owned(),
            })?;
        let bad_id = |source| TopicError::BadId {
            topic: topic.to_owned(),
            source,
        };
        let levels: Vec<&str> = rest.split('/').collect();
        let parsed = match levels.as_slice() {
            ["devices", id, leaf] => {
                let id = DeviceId::new(*id).map_err(bad_id)?;
                match *leaf {
                    "desired" => Topic::Desired(id),
                    "state" => Topic::State(id),
                    "heartbeat" => Topic::Heartbeat(id),
                    "events" => Topic::Events(id),
                    "online" => Topic::Online(id),
                    _ => {
                        return Err(TopicError::Unknown {
                            topic: topic.into(),
                        });
                    }
                }
            }
            ["rollouts", "commands"] => Topic::Commands,
            ["trust"] => Topic::Trust,
            ["rollouts", "replies", id] => Topic::Reply(RequestId::new(*id).map_err(bad_id)?),
            ["rollouts", id, "state"] => Topic::RolloutState(RolloutId::new(*id).map_err(bad_id)?),
            _ => {
                return Err(TopicError::Unknown {
                    topic: topic.into(),
                });
            }
        };
        Ok(parsed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(id: &str) -> DeviceId {
        DeviceId::new(id).unwrap()
    }

    #[test]
    fn every_topic_round_trips() {
        let topics = [
            Topic::Desired(dev("cam-1")),
            Topic::State(dev("cam-1")),
            Topic::Heartbeat(dev("cam-1")),
            Topic::Events(dev("cam-1")),
            Topic::Online(dev("cam-1")),
            Topic::Commands,
            Topic::Reply(RequestId::new("q-7").unwrap()),
            Topic::RolloutState(RolloutId::new("r-42").unwrap()),
            Topic::Trust,
        ];
        for topic in topics {
            let text = topic.to_string();
            assert_eq!(text.parse::<Topic>().unwrap(), topic, "{text}");
        }
        assert_eq!(
            Topic::Heartbeat(dev("cam-1")).to_string(),
            "fleet/v1/devices/cam-1/heartbeat"
        );
        assert_eq!(Topic::filter(Kind::State), "fleet/v1/devices/+/state");
    }

    #[track_caller]
    fn check_err(topic: &str, expect: &str) {
        let err = topic.parse::<Topic>().unwrap_err();
        assert_eq!(err.to_string(), expect);
    }

    #[test]
    fn refuses_what_is_not_a_fleet_topic() {
        check_err(
            "other/v1/devices/a/state",
            "topic \"other/v1/devices/a/state\" is not under fleet/v1/",
        );
        check_err(
            "fleet/v1x/devices/a/state",
            "topic \"fleet/v1x/devices/a/state\" is not under fleet/v1/",
        );
        check_err(
            "fleet/v1/devices/a/b/state",
            "topic \"fleet/v1/devices/a/b/state\" is not a fleet topic: unknown layout",
        );
        check_err(
            "fleet/v1/devices/a/reboot",
            "topic \"fleet/v1/devices/a/reboot\" is not a fleet topic: unknown layout",
        );
        check_err(
            "fleet/v1/devices//state",
            "topic \"fleet/v1/devices//state\": invalid device id: it is empty",
        );
        check_err(
            "fleet/v1/devices/+/state",
            "topic \"fleet/v1/devices/+/state\": invalid device id \"+\": it contains '+'; ids may use only ASCII letters, digits, '-', '_' and '.'",
        );
        check_err(
            "fleet/v1/rollouts/#/state",
            "topic \"fleet/v1/rollouts/#/state\": invalid rollout id \"#\": it contains '#'; ids may use only ASCII letters, digits, '-', '_' and '.'",
        );
    }
}
