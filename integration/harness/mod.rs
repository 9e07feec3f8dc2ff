//! Netns test harness (in progress)
