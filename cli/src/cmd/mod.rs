//! One module per user command.

pub mod adapt;
pub mod down;
pub mod layout;
pub mod logs;
pub mod ls;
pub mod policy;
pub mod scale;
pub mod status;
pub mod up;
pub mod wait;
