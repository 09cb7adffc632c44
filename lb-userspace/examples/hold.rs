fn main() {
    let _dp = lb_userspace::dataplane::Dataplane::load(Default::default()).unwrap();
    std::thread::sleep(std::time::Duration::from_secs(20));
}
