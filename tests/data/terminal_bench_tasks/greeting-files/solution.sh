greet() { printf 'Hello, %s!\n' "$1" > "greetings/$1.txt"; }
for name in alice bob carol; do greet "$name"; done
