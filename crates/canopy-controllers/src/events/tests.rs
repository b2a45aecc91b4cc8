use super::*;

fn recorded(name: &str, reason: &str, message: &str) -> Recorded {
    Recorded {
        component: "replicaset-controller".into(),
        object: ObjectReference {
            api_version: Some("apps/v1".into()),
            kind: Some("ReplicaSet".into()),
            name: Some(name.into()),
            namespace: Some("team-a".into()),
            uid: Some(format!("uid-{name}")),
            resource_version: Some("7".into()),
            field_path: None,
        },
        kind: EventType::Normal,
        reason: reason.into(),
        message: message.into(),
    }
}

/// Correlates and, as a successful write would, remembers the result.
fn written(c: &mut Correlator, r: Recorded, now: Instant) -> Option<Event> {
    let action = c.correlate(r, now)?;
    let (key, event) = match action {
        Action::Create { key, event } => (key, *event),
        Action::Bump {
            key, count, event, ..
        } => {
            let mut event = *event;
            event.count = Some(count);
            (key, event)
        }
    };
    c.remember(key, &event, now);
    Some(event)
}

#[test]
fn an_event_names_its_object_and_source_like_client_go() {
    let mut c = Correlator::default();
    let event = written(
        &mut c,
        recorded("web", "SuccessfulCreate", "Created pod: web-x"),
        Instant::now(),
    )
    .unwrap();
    assert_eq!(event.metadata.namespace.as_deref(), Some("team-a"));
    assert!(event.metadata.name.as_deref().unwrap().starts_with("web."));
    assert_eq!(event.involved_object.kind.as_deref(), Some("ReplicaSet"));
    assert_eq!(event.count, Some(1));
    assert_eq!(event.type_.as_deref(), Some("Normal"));
    assert_eq!(
        event.source.and_then(|s| s.component).as_deref(),
        Some("replicaset-controller")
    );
    assert_eq!(event.first_timestamp, event.last_timestamp);
}

#[test]
fn a_repeated_event_bumps_the_earlier_one() {
    let mut c = Correlator::default();
    let now = Instant::now();
    let first = written(&mut c, recorded("web", "FailedCreate", "quota"), now).unwrap();
    let action = c
        .correlate(recorded("web", "FailedCreate", "quota"), now)
        .unwrap();
    let Action::Bump {
        name, count, event, ..
    } = action
    else {
        panic!("expected a bump, got {action:?}");
    };
    assert_eq!(Some(name), first.metadata.name);
    assert_eq!(count, 2);
    assert_eq!(event.first_timestamp, first.first_timestamp);
    // Another object, or another message, is another Event.
    assert!(matches!(
        c.correlate(recorded("api", "FailedCreate", "quota"), now),
        Some(Action::Create { .. })
    ));
}

#[test]
fn many_different_messages_of_one_reason_are_combined() {
    let mut c = Correlator::default();
    let now = Instant::now();
    for i in 0..AGGREGATE_THRESHOLD {
        let event = written(
            &mut c,
            recorded("web", "SuccessfulCreate", &format!("pod {i}")),
            now,
        )
        .unwrap();
        assert_eq!(event.message, Some(format!("pod {i}")));
    }
    let combined = written(&mut c, recorded("web", "SuccessfulCreate", "pod 10"), now).unwrap();
    assert_eq!(
        combined.message.as_deref(),
        Some("(combined from similar events): pod 10")
    );
    // After the window, messages stand alone again.
    let later = now + AGGREGATE_WINDOW + Duration::from_secs(1);
    let event = written(&mut c, recorded("web", "SuccessfulCreate", "pod 11"), later).unwrap();
    assert_eq!(event.message.as_deref(), Some("pod 11"));
}

#[test]
fn the_spam_filter_lets_a_burst_through_then_one_per_refill() {
    let mut c = Correlator::default();
    let now = Instant::now();
    let through = (0..40)
        .filter(|_| written(&mut c, recorded("web", "FailedCreate", "quota"), now).is_some())
        .count();
    assert_eq!(through, SPAM_BURST as usize);
    // Another object has a bucket of its own.
    assert!(written(&mut c, recorded("api", "FailedCreate", "quota"), now).is_some());
    assert!(
        written(
            &mut c,
            recorded("web", "FailedCreate", "quota"),
            now + SPAM_REFILL
        )
        .is_some()
    );
    assert!(
        written(
            &mut c,
            recorded("web", "FailedCreate", "quota"),
            now + SPAM_REFILL
        )
        .is_none()
    );
}

#[test]
fn cluster_scoped_objects_have_their_events_in_default() {
    let mut c = Correlator::default();
    let mut r = recorded(
        "node-1",
        "NodeNotReady",
        "Node node-1 status is now: NodeNotReady",
    );
    r.object.namespace = None;
    r.object.kind = Some("Node".into());
    let event = written(&mut c, r, Instant::now()).unwrap();
    assert_eq!(event.metadata.namespace.as_deref(), Some("default"));
}
