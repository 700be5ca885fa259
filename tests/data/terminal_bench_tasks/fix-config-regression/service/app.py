from config import HOST, PORT

print(f"listening on {HOST}:{PORT}")
