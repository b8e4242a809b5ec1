import socket, threading
def srv(port):
    s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR,1); s.bind(('198.51.100.1',port)); s.listen(1024)
    while True:
        c,_=s.accept(); c.sendall(b"x"); c.close()
for p in (80,81): threading.Thread(target=srv,args=(p,),daemon=True).start()
threading.Event().wait()
