% rebase('dashboard.tpl', title='Log out', here='logout')
<h1>Log out</h1>
<p>Log out {{session.row['email']}} in this browser?</p>
<form method="post" action="/dashboard/logout" class="stack">
  <input type="hidden" name="csrf" value="{{csrf}}">
  <button type="submit">Log out</button>
</form>
