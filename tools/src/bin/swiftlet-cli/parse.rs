//! The command grammar: one stdin line in, one [`Command`] out.
//!
//! Pure text handling with no client, no screen and no state, so every
//! command and every malformed line can be tested here without a server.
//! A line the grammar cannot read becomes [`Command::Bad`] carrying the
//! usage text to print, never an error: a typo must not end the session.
//! [`HELP`] lives here because it documents this grammar.

use crate::target::Target;

/// `/group` subcommands.
#[derive(Debug, PartialEq)]
pub enum GroupCmd {
    Create { name: String, members: Vec<String> },
    Add { group: u64, users: Vec<String> },
    Remove { group: u64, users: Vec<String> },
    Leave { group: u64 },
    Rename { group: u64, name: String },
    List,
    Info { group: u64 },
}

/// One parsed stdin line.
#[derive(Debug, PartialEq)]
pub enum Command {
    Send { to: Target, text: String },
    Sync { after: u64 },
    Group(GroupCmd),
    Read { conv: Target },
    Receipts { group: u64, msg: u64 },
    Typing { conv: Target },
    Watch { users: Vec<String> },
    Privacy { hide: bool },
    Help,
    Quit,
    Nothing,
    Bad(String),
}

/// `USER` or `#GID`.
fn parse_target(s: &str) -> Option<Target> {
    match s.strip_prefix('#') {
        Some(g) => parse_group_id(g).map(Target::Group),
        None if !s.is_empty() => Some(Target::User(s.to_owned())),
        None => None,
    }
}

/// A group id, with or without its `#`.
fn parse_group_id(s: &str) -> Option<u64> {
    s.strip_prefix('#')
        .unwrap_or(s)
        .parse()
        .ok()
        .filter(|g| *g != 0)
}

/// Split off the first word: `("word", "rest")`, the rest trimmed.
fn word(s: &str) -> (&str, &str) {
    let s = s.trim();
    match s.split_once(char::is_whitespace) {
        Some((w, rest)) => (w, rest.trim()),
        None => (s, ""),
    }
}

/// A group name at the start of `s`: one word, or `"a quoted name"`.
fn take_name(s: &str) -> Option<(String, &str)> {
    let s = s.trim();
    if let Some(quoted) = s.strip_prefix('"') {
        let (name, rest) = quoted.split_once('"')?;
        return Some((name.to_owned(), rest.trim()));
    }
    let (name, rest) = word(s);
    (!name.is_empty()).then(|| (name.to_owned(), rest))
}

fn words(s: &str) -> Vec<String> {
    s.split_whitespace().map(str::to_owned).collect()
}

fn parse_group(rest: &str) -> Command {
    const USAGE: &str = "usage: /group create NAME USER... | add GID USER... | remove GID USER... \
                         | leave GID | rename GID NAME | list | info GID | send GID TEXT";
    let (sub, rest) = word(rest);
    let (gid, after) = word(rest);
    let group = parse_group_id(gid);
    let cmd = match (sub, group) {
        ("create" | "new", _) => match take_name(rest) {
            Some((name, members)) if !name.is_empty() => GroupCmd::Create {
                name,
                members: words(members),
            },
            _ => return Command::Bad("usage: /group create NAME [USER...]".into()),
        },
        ("add", Some(group)) if !after.is_empty() => GroupCmd::Add {
            group,
            users: words(after),
        },
        ("remove" | "rm" | "kick", Some(group)) if !after.is_empty() => GroupCmd::Remove {
            group,
            users: words(after),
        },
        ("leave", Some(group)) if after.is_empty() => GroupCmd::Leave { group },
        ("rename", Some(group)) => match take_name(after) {
            // A quoted name, or the rest of the line as it stands.
            Some((name, "")) if !name.is_empty() => GroupCmd::Rename { group, name },
            Some(_) => GroupCmd::Rename {
                group,
                name: after.to_owned(),
            },
            None => return Command::Bad("usage: /group rename GID NAME".into()),
        },
        ("list" | "ls", _) if rest.is_empty() => GroupCmd::List,
        ("info", Some(group)) if after.is_empty() => GroupCmd::Info { group },
        ("send", Some(group)) if !after.is_empty() => {
            return Command::Send {
                to: Target::Group(group),
                text: after.to_owned(),
            }
        }
        _ => return Command::Bad(USAGE.into()),
    };
    Command::Group(cmd)
}

pub fn parse_command(line: &str) -> Command {
    let line = line.trim();
    if line.is_empty() {
        return Command::Nothing;
    }
    let (cmd, rest) = word(line);
    match cmd {
        "/send" | "/s" => match rest.split_once(char::is_whitespace) {
            Some((to, text)) if !text.trim().is_empty() => match parse_target(to) {
                Some(to) => Command::Send {
                    to,
                    text: text.trim().to_owned(),
                },
                None => Command::Bad(format!("{to:?} is not a user or #GROUP_ID")),
            },
            _ => Command::Bad("usage: /send USER|#GID TEXT".into()),
        },
        "/gsend" | "/gs" => match rest.split_once(char::is_whitespace) {
            Some((gid, text)) if !text.trim().is_empty() => match parse_group_id(gid) {
                Some(g) => Command::Send {
                    to: Target::Group(g),
                    text: text.trim().to_owned(),
                },
                None => Command::Bad(format!("{gid:?} is not a group id")),
            },
            _ => Command::Bad("usage: /gsend GID TEXT".into()),
        },
        "/sync" => {
            if rest.is_empty() {
                Command::Sync { after: 0 }
            } else {
                match rest.parse() {
                    Ok(after) => Command::Sync { after },
                    Err(_) => Command::Bad("usage: /sync [AFTER_SEQ]".into()),
                }
            }
        }
        "/group" | "/g" => parse_group(rest),
        "/read" => match (word(rest), parse_target(rest)) {
            ((_, ""), Some(conv)) => Command::Read { conv },
            _ => Command::Bad("usage: /read USER|#GID".into()),
        },
        "/typing" => match (word(rest), parse_target(rest)) {
            ((_, ""), Some(conv)) => Command::Typing { conv },
            _ => Command::Bad("usage: /typing USER|#GID".into()),
        },
        "/receipts" => {
            let (gid, msg) = word(rest);
            match (
                parse_group_id(gid),
                msg.strip_prefix('#').unwrap_or(msg).parse(),
            ) {
                (Some(group), Ok(msg)) => Command::Receipts { group, msg },
                _ => Command::Bad("usage: /receipts GID MSG_ID".into()),
            }
        }
        "/watch" => Command::Watch { users: words(rest) },
        "/privacy" => match rest {
            "on" => Command::Privacy { hide: true },
            "off" => Command::Privacy { hide: false },
            _ => Command::Bad("usage: /privacy on|off (on hides your last seen)".into()),
        },
        "/help" | "/h" | "/?" => Command::Help,
        "/quit" | "/q" | "/exit" => Command::Quit,
        _ => Command::Bad(format!("unknown command {cmd:?}; /help lists them")),
    }
}

pub const HELP: &str = "\
commands:
  /send USER TEXT         send TEXT to USER (✓ stored, ✓✓ delivered, read)
  /group create NAME U... create a group (NAME one word or \"quoted\") with members U...
  /group add GID U...     add members (admins only)
  /group remove GID U...  remove members (admins only)
  /group leave GID        leave a group
  /group rename GID NAME  rename a group
  /group list             your groups
  /group info GID         a group's members and roles
  /group send GID TEXT    post to a group (also /gsend GID TEXT, /send #GID TEXT)
  /read USER|#GID         mark the conversation read up to its newest message
  /receipts GID MSG_ID    who has read / has / lacks your group message
  /typing USER|#GID       say you are typing (your next message stops it)
  /watch USER...          follow these users' presence (replaces the list)
  /privacy on|off         hide (on) or show (off) your last seen
  /sync [AFTER]           list your inbox after seq AFTER (default 0)
  /help                   this text
  /quit                   leave
a group is written GID or #GID; incoming group messages show as #GID.";

#[cfg(test)]
mod tests {
    use super::*;

    fn user(u: &str) -> Target {
        Target::User(u.into())
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn commands_parse() {
        assert_eq!(
            parse_command("/send bob hi  there "),
            Command::Send {
                to: user("bob"),
                text: "hi  there".into()
            }
        );
        assert!(matches!(parse_command("/send bob"), Command::Bad(_)));
        assert_eq!(parse_command("/sync"), Command::Sync { after: 0 });
        assert_eq!(parse_command("/sync 42"), Command::Sync { after: 42 });
        assert!(matches!(parse_command("/sync x"), Command::Bad(_)));
        assert_eq!(parse_command("  "), Command::Nothing);
        assert_eq!(parse_command("/quit"), Command::Quit);
        assert!(matches!(parse_command("hello"), Command::Bad(_)));
    }

    #[test]
    fn group_commands_parse() {
        assert_eq!(
            parse_command("/group create team alice bob"),
            Command::Group(GroupCmd::Create {
                name: "team".into(),
                members: strings(&["alice", "bob"])
            })
        );
        assert_eq!(
            parse_command("/group create \"the team\" bob"),
            Command::Group(GroupCmd::Create {
                name: "the team".into(),
                members: strings(&["bob"])
            })
        );
        assert_eq!(
            parse_command("/group create solo"),
            Command::Group(GroupCmd::Create {
                name: "solo".into(),
                members: vec![]
            })
        );
        assert!(matches!(parse_command("/group create"), Command::Bad(_)));
        assert_eq!(
            parse_command("/group add 7 carol dave"),
            Command::Group(GroupCmd::Add {
                group: 7,
                users: strings(&["carol", "dave"])
            })
        );
        assert_eq!(
            parse_command("/group remove #7 carol"),
            Command::Group(GroupCmd::Remove {
                group: 7,
                users: strings(&["carol"])
            })
        );
        assert!(matches!(parse_command("/group add 7"), Command::Bad(_)));
        assert!(matches!(parse_command("/group add x bob"), Command::Bad(_)));
        assert!(matches!(parse_command("/group add 0 bob"), Command::Bad(_)));
        assert_eq!(
            parse_command("/group leave #7"),
            Command::Group(GroupCmd::Leave { group: 7 })
        );
        assert_eq!(
            parse_command("/group rename 7 night shift"),
            Command::Group(GroupCmd::Rename {
                group: 7,
                name: "night shift".into()
            })
        );
        assert_eq!(
            parse_command("/group rename 7 \"quoted name\""),
            Command::Group(GroupCmd::Rename {
                group: 7,
                name: "quoted name".into()
            })
        );
        assert!(matches!(parse_command("/group rename 7"), Command::Bad(_)));
        assert_eq!(parse_command("/group list"), Command::Group(GroupCmd::List));
        assert_eq!(
            parse_command("/group info 7"),
            Command::Group(GroupCmd::Info { group: 7 })
        );
        assert!(matches!(parse_command("/group"), Command::Bad(_)));
        assert!(matches!(parse_command("/group frob 7"), Command::Bad(_)));
    }

    #[test]
    fn group_sends_parse() {
        let want = Command::Send {
            to: Target::Group(7),
            text: "hello all".into(),
        };
        assert_eq!(parse_command("/group send 7 hello all"), want);
        assert_eq!(parse_command("/gsend 7 hello all"), want);
        assert_eq!(parse_command("/gsend #7 hello all"), want);
        assert_eq!(parse_command("/send #7 hello all"), want);
        assert!(matches!(parse_command("/gsend bob hi"), Command::Bad(_)));
        assert!(matches!(parse_command("/gsend 7"), Command::Bad(_)));
        assert!(matches!(parse_command("/send #x hi"), Command::Bad(_)));
    }

    #[test]
    fn feature_commands_parse() {
        assert_eq!(
            parse_command("/read bob"),
            Command::Read { conv: user("bob") }
        );
        assert_eq!(
            parse_command("/read #7"),
            Command::Read {
                conv: Target::Group(7)
            }
        );
        assert!(matches!(parse_command("/read"), Command::Bad(_)));
        assert!(matches!(parse_command("/read bob carol"), Command::Bad(_)));
        assert_eq!(
            parse_command("/typing #7"),
            Command::Typing {
                conv: Target::Group(7)
            }
        );
        assert_eq!(
            parse_command("/typing bob"),
            Command::Typing { conv: user("bob") }
        );
        assert!(matches!(parse_command("/typing"), Command::Bad(_)));
        assert_eq!(
            parse_command("/receipts 7 123456"),
            Command::Receipts {
                group: 7,
                msg: 123456
            }
        );
        assert_eq!(
            parse_command("/receipts #7 #123456"),
            Command::Receipts {
                group: 7,
                msg: 123456
            }
        );
        assert!(matches!(parse_command("/receipts 7"), Command::Bad(_)));
        assert_eq!(
            parse_command("/watch bob  carol"),
            Command::Watch {
                users: strings(&["bob", "carol"])
            }
        );
        assert_eq!(parse_command("/watch"), Command::Watch { users: vec![] });
        assert_eq!(
            parse_command("/privacy on"),
            Command::Privacy { hide: true }
        );
        assert_eq!(
            parse_command("/privacy off"),
            Command::Privacy { hide: false }
        );
        assert!(matches!(parse_command("/privacy"), Command::Bad(_)));
    }

    #[test]
    fn short_names_and_aliases_parse_like_the_long_ones() {
        let send = Command::Send {
            to: user("bob"),
            text: "hi".into(),
        };
        assert_eq!(parse_command("/s bob hi"), send);
        assert_eq!(parse_command("  /send   bob   hi  "), send);
        let gsend = Command::Send {
            to: Target::Group(7),
            text: "hi".into(),
        };
        assert_eq!(parse_command("/gs 7 hi"), gsend);
        assert_eq!(parse_command("/g send 7 hi"), gsend);
        assert_eq!(parse_command("/g ls"), Command::Group(GroupCmd::List));
        assert_eq!(
            parse_command("/group new team"),
            Command::Group(GroupCmd::Create {
                name: "team".into(),
                members: vec![]
            })
        );
        for remove in ["rm", "kick"] {
            assert_eq!(
                parse_command(&format!("/group {remove} 7 bob")),
                Command::Group(GroupCmd::Remove {
                    group: 7,
                    users: strings(&["bob"])
                })
            );
        }
        for help in ["/help", "/h", "/?"] {
            assert_eq!(parse_command(help), Command::Help);
        }
        for quit in ["/quit", "/q", "/exit"] {
            assert_eq!(parse_command(quit), Command::Quit);
        }
    }

    #[test]
    fn bad_lines_say_what_is_wrong() {
        let bad = |line: &str| match parse_command(line) {
            Command::Bad(msg) => msg,
            other => panic!("{line:?} parsed as {other:?}"),
        };
        assert_eq!(bad("/send #x hi"), "\"#x\" is not a user or #GROUP_ID");
        assert_eq!(bad("/send # hi"), "\"#\" is not a user or #GROUP_ID");
        assert_eq!(bad("/send"), "usage: /send USER|#GID TEXT");
        assert_eq!(bad("/gsend bob hi"), "\"bob\" is not a group id");
        assert_eq!(bad("/gsend 0 hi"), "\"0\" is not a group id");
        assert_eq!(bad("/gsend 7"), "usage: /gsend GID TEXT");
        assert_eq!(bad("/sync -1"), "usage: /sync [AFTER_SEQ]");
        assert_eq!(bad("/read bob carol"), "usage: /read USER|#GID");
        assert_eq!(bad("/read #0"), "usage: /read USER|#GID");
        assert_eq!(bad("/typing bob carol"), "usage: /typing USER|#GID");
        assert_eq!(bad("/receipts x 5"), "usage: /receipts GID MSG_ID");
        assert_eq!(bad("/receipts 7 x"), "usage: /receipts GID MSG_ID");
        assert_eq!(bad("/receipts 0 5"), "usage: /receipts GID MSG_ID");
        assert_eq!(
            bad("/privacy maybe"),
            "usage: /privacy on|off (on hides your last seen)"
        );
        assert_eq!(bad("/frob"), "unknown command \"/frob\"; /help lists them");
        assert_eq!(bad("hello"), "unknown command \"hello\"; /help lists them");
        assert_eq!(bad("/group create"), "usage: /group create NAME [USER...]");
        assert_eq!(
            bad("/group create \"\" bob"),
            "usage: /group create NAME [USER...]"
        );
        assert_eq!(
            bad("/group rename 7 \"unclosed"),
            "usage: /group rename GID NAME"
        );
        let group_usage = bad("/group");
        assert!(group_usage.starts_with("usage: /group create NAME USER..."));
        for line in [
            "/group frob 7",
            "/group add 7",
            "/group remove 7",
            "/group leave",
            "/group leave 7 now",
            "/group info",
            "/group info 7 8",
            "/group list 7",
            "/group send 7",
            "/group send bob hi",
        ] {
            assert_eq!(bad(line), group_usage, "{line:?}");
        }
    }

    #[test]
    fn a_rename_keeps_an_unquoted_name_as_typed() {
        assert_eq!(
            parse_command("/group rename 7 \"a\" b"),
            Command::Group(GroupCmd::Rename {
                group: 7,
                name: "\"a\" b".into()
            })
        );
    }

    #[test]
    fn help_names_every_command() {
        for cmd in [
            "/send",
            "/group create",
            "/group add",
            "/group remove",
            "/group leave",
            "/group rename",
            "/group list",
            "/group info",
            "/group send",
            "/gsend",
            "/read",
            "/receipts",
            "/typing",
            "/watch",
            "/privacy",
            "/sync",
            "/help",
            "/quit",
        ] {
            assert!(HELP.contains(cmd), "/help does not mention {cmd}");
        }
    }
}
