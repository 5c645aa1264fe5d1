fn main() {
    print!("{}", regmirror_operator::crd::crd_yaml());
}
