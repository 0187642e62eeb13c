//! The reasons conditions give, as closed sets shared by both binaries: a reason is matched by
//! its variant, never by its text.

/// Declares a closed set of condition reasons, each with its CamelCase text.
macro_rules! reasons {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vmeta])* $variant),+
        }

        impl $name {
            /// Every reason of the set.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The reason as a condition carries it.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => stringify!($variant)),+
                }
            }

            /// The reason a condition's text names, if it is one of the set.
            pub fn parse(text: &str) -> Option<Self> {
                Self::ALL.iter().copied().find(|r| r.as_str() == text)
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

reasons! {
    /// Reasons of a Desktop's `SizeApplied` condition (operator).
    SizeReason {
        /// The domain runs with (or, stopped, starts with) the size `spec` asks for.
        Applied,
        /// The new size is admitted and applies at the next restart; until then the host is
        /// charged the larger of the old and the new.
        RestartRequired,
        /// The host cannot hold the new size; the old one keeps running and counting.
        InsufficientCapacity,
    }
}

reasons! {
    /// Reasons of a Desktop's `PoolApplied` condition (operator).
    PoolReason {
        /// `spec.pool` is the pool the desktop is bound in.
        Bound,
        /// `spec.pool` was edited after binding; the binding stays in its pool.
        PoolChangeRefused,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_read_back_from_their_text() {
        for r in SizeReason::ALL {
            assert_eq!(SizeReason::parse(r.as_str()), Some(*r));
        }
        assert_eq!(PoolReason::PoolChangeRefused.as_str(), "PoolChangeRefused");
        assert_eq!(PoolReason::parse("Bound "), None);
    }
}
